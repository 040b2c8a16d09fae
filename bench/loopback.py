"""The ceiling of any TCP transfer engine on this host: bare streaming between two processes over plain sockets
(a sender process writing `block_size` pieces of a registered-size buffer back to back, this process receiving
them into its own buffer with MSG_WAITALL), with no requests, responses, headers or bookkeeping. A
request/response engine over the same loopback cannot go faster; `python -m harness.mooncake.compare` measures it
beside the engines so their ratios can be read against it.

    python -m tsukimi.bench.loopback --connections 4 --block-size 1048576 --duration 3
"""

from __future__ import annotations

import argparse
import json
import mmap
import socket
import subprocess
import sys
import threading
import time

SPAN_BYTES = 32 << 20


def _send_forever(listener: socket.socket, block_size: int) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    span = max(SPAN_BYTES, block_size)
    buffer = mmap.mmap(-1, span)
    buffer.write(b"\x07" * span)
    view, offset = memoryview(buffer), 0
    try:
        while True:
            end = min(offset + block_size, span)
            conn.sendall(view[offset:end])
            offset = 0 if end == span else end
    except OSError:
        pass
    finally:
        conn.close()


def _sender(connections: int, block_size: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
    print(listener.getsockname()[1], flush=True)
    threads = [threading.Thread(target=_send_forever, args=(listener, block_size), daemon=True)
               for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _receive(port: int, block_size: int, deadline: float, totals: list[int], index: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    span = max(SPAN_BYTES, block_size)
    view, offset = memoryview(bytearray(span)), 0
    try:
        while time.monotonic() < deadline:
            end = min(offset + block_size, span)
            got = offset
            while got < end:
                n = sock.recv_into(view[got:end], end - got, socket.MSG_WAITALL)
                if n == 0:
                    raise ConnectionError("sender closed")
                got += n
            totals[index] += end - offset
            offset = 0 if end == span else end
    finally:
        sock.close()


def measure(connections: int = 4, block_size: int = 1 << 20, duration_s: float = 3.0) -> dict:
    """GB/s of bare TCP streaming from a sender process into this one over `connections` sockets."""
    sender = subprocess.Popen([sys.executable, "-m", "tsukimi.bench.loopback", "--role", "sender",
                               "--connections", str(connections), "--block-size", str(block_size)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(sender.stdout.readline())
        totals = [0] * connections
        started = time.monotonic()
        threads = [threading.Thread(target=_receive, args=(port, block_size, started + duration_s, totals, i))
                   for i in range(connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    finally:
        sender.kill()
        sender.wait()
    return {"connections": connections, "block_size": block_size, "duration_s": round(elapsed, 3),
            "num_bytes": sum(totals), "gb_per_s": round(sum(totals) / elapsed / 1e9, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsukimi.bench.loopback")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=1 << 20)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--role", choices=("receiver", "sender"), default="receiver", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "sender":
        _sender(args.connections, args.block_size)
        return 0
    print(json.dumps(measure(args.connections, args.block_size, args.duration)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
