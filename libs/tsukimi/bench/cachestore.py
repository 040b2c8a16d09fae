"""`tsukimi bench cachestore`: put and get throughput of the KV cache pool (metadata over gRPC, bytes through
the transfer engine), against a cachestore process it starts. Output keys match `bench/mooncake_store.py`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import zlib

import grpc
import numpy as np

from tsukimi.common.natsserver import NatsServer, free_port
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.batch import Op, TransferRequest
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import NatsMetadataStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=int, default=256 << 10)
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--batch", action="store_true", help="batches of --batch-size concurrent operations")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per op")
    parser.add_argument("--transport", choices=("shm", "tcp"), default="shm")
    parser.add_argument("--json", action="store_true")


def _start_pool(args, nats_url: str, secret: str) -> tuple[subprocess.Popen, str]:
    grpc_port = free_port()
    env = dict(os.environ, TSUKIMI_NATS_URL=nats_url, TSUKIMI_CLUSTER_SECRET=secret,
               TSUKIMI_CACHESTORE_GRPC_PORT=str(grpc_port), TSUKIMI_INSTANCE_ID="bench-cachestore",
               TSUKIMI_CACHE_DRAM_BYTES=str(2 * args.block_size * args.num_blocks + (64 << 20)),
               TSUKIMI_LOG_LEVEL="WARNING")
    process = subprocess.Popen([sys.executable, "-m", "tsukimi", "cachestore"], env=env)
    return process, f"127.0.0.1:{grpc_port}"


async def _measure(args, nats_url: str, secret: str, address: str) -> list[dict]:
    import nats

    nc = await nats.connect(nats_url)
    engine = await TransferEngine("bench-client", secret.encode(), NatsMetadataStore(nc),
                                  force_transport=args.transport).start()
    data = np.random.default_rng(0).integers(0, 256, args.block_size * args.num_blocks, dtype=np.uint8)
    back = np.zeros_like(data)
    src, dst = engine.register(data, read_only=True), engine.register(back)
    blocks = [data[i * args.block_size:(i + 1) * args.block_size] for i in range(args.num_blocks)]
    sums = [f"{zlib.crc32(b):08x}" for b in blocks]
    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.CacheStoreStub(channel)
    for _ in range(100):
        try:
            await stub.Stats(pb.Empty(), timeout=1)
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    group = args.batch_size if args.batch else 1
    generation = 0

    async def put_round() -> int:
        nonlocal generation
        generation += 1
        keys = [generation.to_bytes(4, "big") + i.to_bytes(28, "big") for i in range(args.num_blocks)]
        for start in range(0, args.num_blocks, group):
            idx = range(start, min(start + group, args.num_blocks))
            starts = (await stub.BatchPutStart(pb.BatchPutStartRequest(puts=[pb.PutStartRequest(
                key=keys[i], size=args.block_size, checksum=sums[i], num_replicas=1) for i in idx]))).puts
            requests = [TransferRequest(Op.WRITE, src, i * args.block_size, r.replicas[0].segment,
                                        r.replicas[0].buffer_id, r.replicas[0].offset, args.block_size)
                        for i, r in zip(idx, starts)]
            await engine.transfer(requests)
            await stub.BatchPutEnd(pb.KeysRequest(keys=[keys[i] for i in idx]))
        return len(keys)

    async def get_round(keys) -> int:
        for start in range(0, len(keys), group):
            idx = range(start, min(start + group, len(keys)))
            gets = (await stub.BatchGet(pb.KeysRequest(keys=[keys[i] for i in idx]))).gets
            requests = [TransferRequest(Op.READ, dst, i * args.block_size, g.replicas[0].segment,
                                        g.replicas[0].buffer_id, g.replicas[0].offset, args.block_size)
                        for i, g in zip(idx, gets)]
            await engine.transfer(requests)
            await stub.BatchRelease(pb.BatchReleaseRequest(releases=[
                pb.ReleaseRequest(key=keys[i], lease_id=g.lease_id) for i, g in zip(idx, gets)]))
        return len(keys)

    async def remove(gen: int) -> None:
        keys = [gen.to_bytes(4, "big") + i.to_bytes(28, "big") for i in range(args.num_blocks)]
        await stub.BatchRemove(pb.KeysRequest(keys=keys))

    results = []
    num, started = 0, time.monotonic()
    while time.monotonic() - started < args.duration:
        if generation:
            await remove(generation)  # NOTE: freeing the previous round counts in the put time
        num += await put_round()
    elapsed = time.monotonic() - started
    results.append({"op": "put", "ops_per_s": num / elapsed, "elapsed_s": elapsed})
    keys = [generation.to_bytes(4, "big") + i.to_bytes(28, "big") for i in range(args.num_blocks)]
    await get_round(keys)
    assert np.array_equal(back, data), "read back bytes differ"
    num, started = 0, time.monotonic()
    while time.monotonic() - started < args.duration:
        num += await get_round(keys)
    elapsed = time.monotonic() - started
    results.append({"op": "get", "ops_per_s": num / elapsed, "elapsed_s": elapsed})
    await channel.close()
    await engine.close()
    await nc.close()
    for r in results:
        r.update(system="tsukimi-cachestore", transport=args.transport, block_size=args.block_size,
                 batch=args.batch, batch_size=group, ops_per_s=round(r["ops_per_s"], 1),
                 gb_per_s=round(r["ops_per_s"] * args.block_size / 1e9, 3), elapsed_s=round(r["elapsed_s"], 3))
    return results


def run(args) -> list[dict]:
    secret = secrets.token_hex(16)
    with NatsServer() as server:
        process, address = _start_pool(args, server.url, secret)
        try:
            return asyncio.run(_measure(args, server.url, secret, address))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def print_results(results: list[dict], as_json: bool) -> None:
    for r in results:
        if as_json:
            print(json.dumps(r))
        else:
            print(f"{r['system']} {r['op']} ({r['transport']}, block {r['block_size']} B, "
                  f"{'batch ' + str(r['batch_size']) if r['batch'] else 'single'}): {r['ops_per_s']:.0f} ops/s, "
                  f"{r['gb_per_s']:.3f} GB/s")
