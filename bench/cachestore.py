"""`tsukimi bench cachestore`: put and get throughput of the KV cache pool (metadata over gRPC, bytes through
the transfer engine) through `PoolClient`, against a cachestore process it starts. Output keys match
`harness/mooncake/store.py`. `--inflight N` keeps up to N batches under way at once (pipelining: the next batch's
metadata call overlaps this batch's copies); the default, 1, runs the batches one after the other. The batch calls
go as messages of one `CacheStore.Session` stream (`PoolSession`), on the pool's session lane unless `--no-lane`;
`--unary` makes each a call of its own."""

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

import grpc
import numpy as np

from tsukimi.kvpool.checksum import block_checksum
from tsukimi.common.natsserver import NatsServer, free_port
from tsukimi.kvpool.pool_client import PoolClient
from tsukimi.kvpool.pool_session import PoolSession
from tsukimi.common.settings import Settings
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import NatsMetadataStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=int, default=256 << 10)
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--batch", action="store_true", help="batches of --batch-size concurrent operations")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per op")
    parser.add_argument("--inflight", type=int, default=1,
                        help="batches under way at once (pipelining; 1: each batch waits for the one before)")
    parser.add_argument("--transport", choices=("shm", "tcp"), default="shm")
    parser.add_argument("--unary", action="store_true",
                        help="each batch call a unary gRPC call (default: messages of one session stream)")
    parser.add_argument("--no-lane", action="store_true",
                        help="session messages on the gRPC stream (default: the pool's session lane)")
    parser.add_argument("--hold-leases", type=int, default=Settings.model_fields["cache_hold_leases"].default,
                        help="leases the client keeps to read their blocks again with no call to the master, as "
                             "the workers' clients do (default: their setting's default; 0: every get asks the "
                             "master)")
    parser.add_argument("--reserve-bytes", type=int, default=Settings.model_fields["cache_reserve_bytes"].default,
                        help="bytes of reserved slots the client keeps to put blocks with no put start, as the "
                             "workers' clients do (default: their setting's default; 0: every put asks the master)")
    parser.add_argument("--verify", action="store_true",
                        help="timed gets verify each block's checksum, as the prefill's reads do")
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
    sums = [block_checksum(b) for b in blocks]
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

    size = args.block_size
    # The block indices of each batch.
    batches = [range(start, min(start + group, args.num_blocks)) for start in range(0, args.num_blocks, group)]

    def keys_of(gen: int) -> list[bytes]:
        return [gen.to_bytes(4, "big") + i.to_bytes(28, "big") for i in range(args.num_blocks)]

    session = None if args.unary else PoolSession(stub, None if args.no_lane else secret.encode())
    client = PoolClient(session or stub, engine, rpc_timeout_s=10.0, hold_leases=args.hold_leases,
                        reserve_bytes=args.reserve_bytes)
    sizes, offsets = [size] * args.num_blocks, [i * size for i in range(args.num_blocks)]

    async def in_flight(run_batch) -> None:
        # Up to --inflight batches under way at once (1: one after the other, as a plain loop), issued in order.
        if args.inflight == 1:
            for idx in batches:
                await run_batch(idx)
            return
        slots = asyncio.Semaphore(args.inflight)

        async def one(idx: range) -> None:
            async with slots:
                await run_batch(idx)

        await asyncio.gather(*(asyncio.ensure_future(one(idx)) for idx in batches))

    async def put_round(keys: list[bytes]) -> int:
        # A writer's calls per batch (`PoolClient.put_many`): BatchPutStart (carrying the previous batch's put
        # ends), the WRITEs of the blocks to the replicas it got; the round ends with a flush of the last ends
        # (every block of the round visible when it is timed as done).
        async def run_batch(idx: range) -> None:
            written = await client.put_many(keys[idx.start:idx.stop], src, offsets[idx.start:idx.stop],
                                            sizes[idx.start:idx.stop], sums[idx.start:idx.stop])
            assert all(written), "a put was refused"

        await in_flight(run_batch)
        await client.flush()
        return args.num_blocks

    async def get_round(keys: list[bytes], verify: bool = False) -> int:
        # A reader's calls per batch (`PoolClient.get_many`): BatchGet (carrying the previous batch's lease
        # releases), the READs; the last releases ride on the next round's first call (the timed rounds end with
        # a flush of the very last ones, timed, as a reader's `close` would send them). NOTE: the timed rounds
        # verify the blocks' checksums only with --verify (Mooncake Store's gets verify nothing); the untimed first
        # round checks bytes and checksums.
        async def run_batch(idx: range) -> None:
            read = await client.get_many(keys[idx.start:idx.stop], dst, offsets[idx.start:idx.stop],
                                         sizes[idx.start:idx.stop], verify=verify)
            assert all(read), "a get missed"

        await in_flight(run_batch)
        return args.num_blocks

    results = []
    # NOTE: like the Mooncake Store harness (harness/mooncake/store.py), the previous round's keys are removed
    # between rounds untimed, so the pool never fills; the removal time is reported as remove_s.
    num, busy, removing = 0, 0.0, 0.0
    while busy < args.duration:
        if generation:
            started = time.monotonic()
            await stub.BatchRemove(pb.KeysRequest(keys=keys_of(generation)))
            removing += time.monotonic() - started
        generation += 1
        keys = keys_of(generation)
        started = time.monotonic()
        num += await put_round(keys)
        busy += time.monotonic() - started
    results.append({"op": "put", "ops_per_s": num / busy, "elapsed_s": busy, "remove_s": removing})
    keys = keys_of(generation)
    await get_round(keys, verify=True)
    await client.flush()
    assert np.array_equal(back, data), "read back bytes differ"
    assert [block_checksum(back[i * size:(i + 1) * size]) for i in range(args.num_blocks)] == sums
    num, started, num_held = 0, time.monotonic(), client.num_held_reads
    while time.monotonic() - started < args.duration:
        num += await get_round(keys, verify=args.verify)
    await client.flush()
    elapsed = time.monotonic() - started
    # The share of the timed gets read under leases the client held (no call to the master for them).
    results.append({"op": "get", "ops_per_s": num / elapsed, "elapsed_s": elapsed,
                    "held_share": round((client.num_held_reads - num_held) / num, 3)})
    await client.close()
    # How the session's messages went ("lane" or "grpc"), read before it closes.
    calls = "unary" if session is None else f"session ({session.transport})"
    if session is not None:
        await session.close()
    stats = await stub.Stats(pb.Empty())
    assert stats.num_blocks == args.num_blocks, f"{stats.num_blocks} blocks in the pool after the rounds, not {args.num_blocks}"
    await channel.close()
    await engine.close()
    await nc.close()
    for r in results:
        r.update(system="tsukimi-cachestore", transport=args.transport, block_size=args.block_size,
                 batch=args.batch, batch_size=group, inflight=args.inflight, verify=args.verify,
                 hold_leases=client.hold_leases, reserve_bytes=client.reserve_bytes,
                 calls=calls, ops_per_s=round(r["ops_per_s"], 1),
                 gb_per_s=round(r["ops_per_s"] * args.block_size / 1e9, 3), elapsed_s=round(r["elapsed_s"], 3))
        if "remove_s" in r:
            r["remove_s"] = round(r["remove_s"], 3)
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
