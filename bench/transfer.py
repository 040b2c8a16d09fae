"""`tsukimi bench transfer`: throughput and latency of the transfer engine between two processes, in the spirit
of Mooncake's transfer_engine_bench (a target that registers memory, an initiator that batches requests)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

from tsukimi.transfer.batch import Op, Status, TransferRequest
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import NatsMetadataStore

TARGET_SEGMENT = "bench-target"
# The owner tag of every block of a guarded target (`--guarded`).
GUARD_TAG = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=("shm", "tcp"), default="tcp")
    parser.add_argument("--op", choices=("read", "write"), default="write")
    parser.add_argument("--block-size", type=int, default=1 << 20, help="bytes per request")
    parser.add_argument("--batch-size", type=int, default=32, help="requests per batch")
    parser.add_argument("--threads", type=int, default=2, help="concurrent submitters")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of measurement")
    parser.add_argument("--connections", type=int, default=4, help="tcp connections per peer")
    parser.add_argument("--window", type=int, default=16, help="tcp requests in flight per connection")
    parser.add_argument("--nats-url", default=None, help="metadata service (default: an embedded NATS)")
    parser.add_argument("--guarded", action="store_true",
                        help="the target guards its buffer (one owner tag per block), writes carry the tag")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _buffer_bytes(args) -> int:
    return max(64 << 20, args.block_size * args.batch_size * args.threads)


async def _target(args, secret: bytes, ready_fd: int) -> None:
    import nats

    nc = await nats.connect(args.nats_url)
    engine = TransferEngine(TARGET_SEGMENT, secret, NatsMetadataStore(nc), num_connections=args.connections)
    await engine.start()
    buffer = engine.allocate(_buffer_bytes(args))
    np.frombuffer(buffer.view, dtype=np.uint8)[:] = 7
    if args.guarded:
        guard = engine.guard(buffer, args.block_size)
        guard.assign(range(guard.num_units), GUARD_TAG)
    await engine.publish()
    os.write(ready_fd, b"ready\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await engine.close()
    await nc.close()


async def _initiator(args, secret: bytes) -> dict:
    import nats

    nc = await nats.connect(args.nats_url)
    engine = TransferEngine("bench-initiator", secret, NatsMetadataStore(nc), force_transport=args.transport,
                            num_connections=args.connections, window=args.window)
    await engine.start()
    size = _buffer_bytes(args)
    local = np.full(size, 3, dtype=np.uint8)
    local_buffer = engine.register(local)
    descriptor = await engine.open_segment(TARGET_SEGMENT)
    target_id = descriptor.buffers[0].buffer_id
    op = Op.READ if args.op == "read" else Op.WRITE
    tag = GUARD_TAG if args.guarded else 0
    span = args.block_size * args.batch_size
    latencies: list[float] = []
    num_bytes = 0
    num_failed = 0

    async def submitter(worker: int) -> None:
        nonlocal num_bytes, num_failed
        base = worker * span
        while time.monotonic() < deadline:
            requests = [TransferRequest(op, local_buffer, base + i * args.block_size, TARGET_SEGMENT, target_id,
                                        base + i * args.block_size, args.block_size, tag)
                        for i in range(args.batch_size)]
            statuses = await engine.wait(await engine.submit(requests))
            for st in statuses:
                if st.status == Status.COMPLETED:
                    num_bytes += st.transferred_bytes
                    latencies.append(st.latency_s)
                else:
                    num_failed += 1

    # Warm-up: connections and mappings.
    deadline = time.monotonic() + 0.5
    await asyncio.gather(*[submitter(w) for w in range(args.threads)])
    latencies.clear()
    num_bytes = 0
    started = time.monotonic()
    deadline = started + args.duration
    await asyncio.gather(*[submitter(w) for w in range(args.threads)])
    elapsed = time.monotonic() - started
    await engine.close()
    await nc.close()
    ordered = sorted(latencies) or [0.0]
    return {
        "system": "tsukimi", "transport": args.transport, "op": args.op, "block_size": args.block_size,
        "is_guarded": args.guarded,
        "batch_size": args.batch_size, "threads": args.threads, "connections": args.connections, "window": args.window,
        "duration_s": round(elapsed, 3), "gb_per_s": round(num_bytes / elapsed / 1e9, 3),
        "requests_per_s": round(len(latencies) / elapsed, 1), "failed": num_failed,
        "p50_latency_ms": round(statistics.median(ordered) * 1e3, 3),
        "p99_latency_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3, 3),
    }


def run(args) -> dict:
    """Starts NATS (unless given) and a target process, measures from this process, returns the figures."""
    from tsukimi.common.natsserver import NatsServer

    server = None
    if args.nats_url is None:
        server = NatsServer().start()
        args.nats_url = server.url
    secret = secrets.token_bytes(32)
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, TSUKIMI_BENCH_SECRET=secret.hex())
    cmd = [sys.executable, "-m", "tsukimi.bench.transfer", "--role", "target", "--ready-fd", str(write_fd),
           "--nats-url", args.nats_url, "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--connections", str(args.connections)] + (
               ["--guarded"] if args.guarded else [])
    target = subprocess.Popen(cmd, env=env, pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as ready:
            if ready.readline().strip() != "ready":
                raise RuntimeError("bench target failed to start")
        return asyncio.run(_initiator(args, secret))
    finally:
        target.send_signal(signal.SIGTERM)
        try:
            target.wait(10)
        except subprocess.TimeoutExpired:
            target.kill()
        if server is not None:
            server.stop()


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(f"{result['system']} {result['transport']} {result['op']}: block {result['block_size']} B, batch "
          f"{result['batch_size']}, {result['threads']} threads: {result['gb_per_s']:.3f} GB/s, "
          f"{result['requests_per_s']:.0f} req/s, latency p50 {result['p50_latency_ms']:.2f} ms "
          f"p99 {result['p99_latency_ms']:.2f} ms, failed {result['failed']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsukimi bench transfer")
    add_arguments(parser)
    parser.add_argument("--role", choices=("initiator", "target"), default="initiator", help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "target":
        asyncio.run(_target(args, bytes.fromhex(os.environ["TSUKIMI_BENCH_SECRET"]), args.ready_fd))
        return 0
    print_result(run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
