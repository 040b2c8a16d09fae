"""Round trips of `CacheStore.Session` messages between two processes, with grpc's defaults and with the settings
tsukimi starts with (`tsukimi.kvpool.grpc_defaults`), interleaved, and the same messages on the session lane
(`lane_*`, no gRPC): what one metadata call of the pool costs on the wire and in grpc, before any pool work (the
server answers empty put ends and gets of unknown keys), beside a 100-byte asyncio echo between the same two
processes (the floor of any protocol on an asyncio loop; scripts/bench-loopback.sh rtt gives the C one).

    python -m tsukimi.bench.session_rtt [--rounds 3] [--num 3000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from importlib import metadata

from tsukimi.kvpool import grpc_defaults
from tsukimi.common.natsserver import free_port

_SECRET = b"session-rtt"


async def _serve(port: int) -> None:
    import grpc

    from tsukimi.cachestore.master import PoolMaster
    from tsukimi.cachestore.pool import Pool
    from tsukimi.cachestore.servicer import CacheStoreServicer
    from tsukimi.cachestore.session_lane import SessionLane
    from tsukimi.proto import cachestore_pb2_grpc as pb_grpc

    server = grpc.aio.server()
    servicer = CacheStoreServicer(Pool(PoolMaster()))
    pb_grpc.add_CacheStoreServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    lane = await SessionLane(servicer, _SECRET, "127.0.0.1", 0).start()
    servicer.lane_address = f"127.0.0.1:{lane.port}"
    echo = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", 0)
    print(f"ready {echo.sockets[0].getsockname()[1]}", flush=True)
    await server.wait_for_termination()


class _Echo(asyncio.Protocol):
    """Sends back what it receives: the asyncio floor under any protocol's round trip."""

    def connection_made(self, transport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _measure(port: int, echo_port: int, num: int) -> dict:
    import grpc

    from tsukimi.kvpool.pool_session import PoolSession
    from tsukimi.proto import cachestore_pb2 as pb
    from tsukimi.proto import cachestore_pb2_grpc as pb_grpc

    result = {}
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = bytes(100)
    for n in (num // 10, num):
        started = time.perf_counter()
        for _ in range(n):
            writer.write(message)
            await reader.readexactly(len(message))
    result["asyncio_echo_us"] = round(1e6 * (time.perf_counter() - started) / num, 1)
    writer.close()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.CacheStoreStub(channel)
    keys = [bytes([i]) * 32 for i in range(32)]
    for prefix, secret in (("", None), ("lane_", _SECRET)):
        session = PoolSession(stub, secret)
        for label, call in (("empty_us", lambda: session.BatchPutEnd(pb.KeysRequest(), 5.0)),
                            ("get_32_misses_us", lambda: session.BatchGet(pb.KeysRequest(keys=keys), 5.0))):
            for _ in range(num // 10):
                await call()
            started = time.perf_counter()
            for _ in range(num):
                await call()
            result[prefix + label] = round(1e6 * (time.perf_counter() - started) / num, 1)
        assert session.transport == ("lane" if secret else "grpc"), session.transport
        await session.close()
    await channel.close()
    return result


def _one(experiments: str | None, num: int) -> dict:
    """Server and client in two fresh processes with GRPC_EXPERIMENTS set to `experiments` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if experiments is not None:
        env["GRPC_EXPERIMENTS"] = experiments
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tsukimi.bench.session_rtt", "--serve", str(port)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        ready = server.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError("the session server did not start")
        out = subprocess.run([sys.executable, "-m", "tsukimi.bench.session_rtt", "--client", str(port),
                              "--echo-port", ready[1], "--num", str(num)], env=env, capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)
    finally:
        server.terminate()
        server.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsukimi.bench.session_rtt", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num", type=int, default=3000, help="round trips per measurement")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve))
        return 0
    if args.client:
        print(json.dumps(asyncio.run(_measure(args.client, args.echo_port, args.num))))
        return 0
    tuned = grpc_defaults.experiments_for(metadata.version("grpcio"))
    samples: dict[str, list[dict]] = {"grpc_defaults": [], "tsukimi": []}
    for _ in range(args.rounds):
        samples["grpc_defaults"].append(_one(None, args.num))
        samples["tsukimi"].append(_one(tuned, args.num) if tuned is not None else samples["grpc_defaults"][-1])
    medians = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}
    if args.json:
        print(json.dumps({"grpc_experiments": tuned, "median": medians, "samples": samples}))
    else:
        for name, m in medians.items():
            print(f"{name:14} gRPC stream: empty {m['empty_us']:.0f} us, get of 32 unknown keys "
                  f"{m['get_32_misses_us']:.0f} us; session lane: {m['lane_empty_us']:.0f} us, "
                  f"{m['lane_get_32_misses_us']:.0f} us; a 100-byte asyncio echo {m['asyncio_echo_us']:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
