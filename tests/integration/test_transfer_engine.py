"""The transfer engine between two processes, over real NATS metadata, on shm and tcp."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import nats
import numpy as np
import pytest

from tsukimi.transfer import wire
from tsukimi.transfer.batch import Op, Status, TransferRequest
from tsukimi.transfer.engine import TransferEngine, TransferError
from tsukimi.transfer.metadata import NatsMetadataStore

from .transfer_target import BUCKET, SIZE, read_only_pattern

SECRET = os.urandom(32)
TARGET = os.path.join(os.path.dirname(__file__), "transfer_target.py")


class Target:
    def __init__(self, nats_url: str):
        self.segment = "target-" + uuid.uuid4().hex[:8]
        self.process = subprocess.Popen([sys.executable, TARGET, nats_url, self.segment, SECRET.hex()],
                                        stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.process.stdout.readline())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def target(nats_url):
    t = Target(nats_url)
    yield t
    t.stop()


@pytest.fixture
async def nc(nats_url):
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def initiator(nc, transport: str, secret: bytes = SECRET, timeout_s: float = 3.0) -> TransferEngine:
    engine = TransferEngine("init-" + uuid.uuid4().hex[:8], secret, NatsMetadataStore(nc, ttl_s=2.0, bucket=BUCKET),
                            force_transport=transport, timeout_s=timeout_s, slice_bytes=256 << 10)
    return await engine.start()


def buffer_for(transport: str, target: Target) -> int:
    # shm needs shared memory on the target side; tcp reaches any registered buffer.
    return target.info["shared"] if transport == "shm" else target.info["private"]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_odd_sizes_and_offsets_round_trip_byte_exact(nc, target, transport):
    engine = await initiator(nc, transport)
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, SIZE, dtype=np.uint8)
    dst = np.zeros(SIZE, dtype=np.uint8)
    local_src, local_dst = engine.register(src, read_only=True), engine.register(dst)
    remote = buffer_for(transport, target)
    try:
        for length, local_off, remote_off in [(1, 0, 0), (7, 3, 5), (4095, 11, 4097), (65537, 1, 99),
                                              ((1 << 20) + 3, 17, 12345), ((3 << 20) + 11, 7, (4 << 20) + 1)]:
            await engine.write(local_src, local_off, target.segment, remote, remote_off, length)
            await engine.read(local_dst, 0, target.segment, remote, remote_off, length)
            assert np.array_equal(dst[:length], src[local_off:local_off + length]), (length, local_off, remote_off)
    finally:
        await engine.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_many_requests_and_concurrent_batches(nc, target, transport):
    engine = await initiator(nc, transport)
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, SIZE, dtype=np.uint8)
    dst = np.zeros(SIZE, dtype=np.uint8)
    local_src, local_dst = engine.register(src), engine.register(dst)
    remote = buffer_for(transport, target)
    # 4 concurrent batches of 50 requests each, over disjoint 2 MiB quarters, random sizes.
    quarters = []
    for q in range(4):
        offsets, sizes, at = [], [], q * (2 << 20)
        for _ in range(50):
            size = int(rng.integers(1, 40000))
            offsets.append(at)
            sizes.append(size)
            at += size
        assert at <= (q + 1) * (2 << 20)
        quarters.append(list(zip(offsets, sizes)))

    async def run(op: Op, local, pieces) -> list:
        requests = [TransferRequest(op, local, off, target.segment, remote, off, n) for off, n in pieces]
        return await engine.transfer(requests)

    try:
        results = await asyncio.gather(*[run(Op.WRITE, local_src, p) for p in quarters])
        assert all(st.status == Status.COMPLETED and st.transport == transport for r in results for st in r)
        await asyncio.gather(*[run(Op.READ, local_dst, p) for p in quarters])
        for pieces in quarters:
            for off, n in pieces:
                assert np.array_equal(dst[off:off + n], src[off:off + n])
    finally:
        await engine.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_bounds_unknown_buffers_and_read_only_are_refused(nc, target, transport):
    engine = await initiator(nc, transport)
    local = engine.register(np.zeros(1 << 20, dtype=np.uint8))
    remote = buffer_for(transport, target)
    try:
        cases = [
            (Op.WRITE, remote, SIZE - 10, 20, "exceeds"),
            (Op.READ, remote, SIZE, 1, "exceeds"),
            (Op.WRITE, 999, 0, 10, "has no buffer 999"),
            (Op.WRITE, target.info["read_only"], 0, 10, "read-only"),
            (Op.WRITE, remote, 0, 0, "invalid range"),
        ]
        batch = await engine.submit([TransferRequest(op, local, 0, target.segment, buf, off, n)
                                     for op, buf, off, n, _ in cases])
        statuses = await engine.wait(batch)
        for st, (*_, expected) in zip(statuses, cases):
            assert st.status == Status.FAILED and expected in st.error, st
        # The target is unharmed and still serves; read-only memory is readable.
        if transport == "tcp":
            await engine.read(local, 0, target.segment, target.info["read_only"], 100, 1000)
            assert bytes(np.asarray(local.view[:1000])) == read_only_pattern()[100:1100]
        with pytest.raises(TransferError, match="exceeds"):
            await engine.read(local, 0, target.segment, remote, SIZE - 1, 2)
    finally:
        await engine.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_notification_arrives_after_the_data(nc, target, transport):
    engine = await initiator(nc, transport)
    local = engine.register(np.full(16, 42, dtype=np.uint8))
    try:
        await engine.write(local, 0, target.segment, target.info["shared"], 0, 16)
        await engine.notify(target.segment, b"kv ready: r1")
        line = await asyncio.to_thread(target.process.stdout.readline)
        assert json.loads(line) == {"notified": b"kv ready: r1".hex(), "first_byte": 42}
    finally:
        await engine.close()


async def test_shm_never_falls_back_silently(nc, target):
    engine = await initiator(nc, "shm")
    local = engine.register(np.zeros(1024, dtype=np.uint8))
    try:
        with pytest.raises(TransferError, match="private memory"):
            await engine.write(local, 0, target.segment, target.info["private"], 0, 1024)
    finally:
        await engine.close()


async def test_server_enforces_read_only_and_bounds_itself(target):
    """A client that skips the engine's own checks still cannot write read-only or out-of-range memory."""
    host, port = target.info["address"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        wire.client_handshake(sock, SECRET)
        for buffer_id, offset, expected in [(target.info["read_only"], 0, wire.STATUS_ACCESS),
                                            (target.info["private"], SIZE - 1, wire.STATUS_BOUNDS),
                                            (4242, 0, wire.STATUS_NO_BUFFER)]:
            sock.sendall(wire.REQUEST.pack(wire.OP_WRITE, buffer_id, 1, offset, 16) + b"x" * 16)
            _, status, n = wire.RESPONSE.unpack(wire.recv_exact(sock, wire.RESPONSE.size))
            wire.recv_exact(sock, n)
            assert status == expected
        sock.sendall(wire.REQUEST.pack(wire.OP_READ, target.info["read_only"], 2, 0, 8))
        _, status, _ = wire.RESPONSE.unpack(wire.recv_exact(sock, wire.RESPONSE.size))
        assert status == wire.STATUS_OK and wire.recv_exact(sock, 8) == read_only_pattern()[:8]


async def test_unauthenticated_peers_get_nothing(nc, target):
    host, port = target.info["address"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        hello = wire.recv_exact(sock, 37)
        assert hello[:4] == wire.MAGIC
        # A bogus proof, then a request: the server refuses and closes without serving it.
        sock.sendall(os.urandom(64) + wire.REQUEST.pack(wire.OP_READ, target.info["read_only"], 1, 0, 64))
        answer = sock.recv(64)
        assert answer[:1] == bytes([wire.STATUS_REFUSED])
        rest = b""
        try:
            while chunk := sock.recv(4096):
                rest += chunk
        except ConnectionResetError:
            pass  # NOTE: closing with our unread request pending resets the connection: also a refusal.
        assert read_only_pattern()[:64] not in answer + rest
    wrong = await initiator(nc, "tcp", secret=b"not the secret")
    local = wrong.register(np.zeros(64, dtype=np.uint8))
    try:
        with pytest.raises(TransferError, match="secret"):
            await wrong.read(local, 0, target.segment, target.info["read_only"], 0, 64)
    finally:
        await wrong.close()


async def test_target_killed_mid_transfer_fails_in_time_and_descriptor_expires(nc, nats_url):
    target = Target(nats_url)
    engine = await initiator(nc, "tcp", timeout_s=2.0)
    src = engine.register(np.ones(SIZE, dtype=np.uint8))
    try:
        requests = [TransferRequest(Op.WRITE, src, 0, target.segment, target.info["private"], 0, SIZE)
                    for _ in range(200)]
        batch = await engine.submit(requests)
        await asyncio.sleep(0.2)
        target.process.send_signal(signal.SIGKILL)
        started = time.monotonic()
        statuses = await engine.wait(batch, timeout_s=15)
        assert time.monotonic() - started < 10
        assert any(st.status in (Status.FAILED, Status.TIMEOUT) for st in statuses)
        assert all(st.status.is_final for st in statuses)
        # Its descriptor expires with the metadata TTL (2 s here).
        deadline = time.monotonic() + 8
        while await NatsMetadataStore(nc, ttl_s=2.0, bucket=BUCKET).get(target.segment) is not None:
            assert time.monotonic() < deadline, "descriptor outlived its process"
            await asyncio.sleep(0.25)
        with pytest.raises(TransferError, match="not published"):
            await engine.open_segment(target.segment, refresh=True)
    finally:
        target.stop()
        await engine.close()


async def test_shm_refuses_a_dead_target(nc, nats_url):
    target = Target(nats_url)
    engine = await initiator(nc, "shm")
    local = engine.register(np.ones(4096, dtype=np.uint8))
    try:
        await engine.write(local, 0, target.segment, target.info["shared"], 0, 4096)
        target.process.send_signal(signal.SIGKILL)
        target.process.wait(5)
        with pytest.raises(TransferError, match="is gone"):
            await engine.write(local, 0, target.segment, target.info["shared"], 0, 4096)
    finally:
        target.stop()
        await engine.close()


async def test_metadata_store_refreshes_on_the_buckets_own_ttl(nc):
    bucket = "ttl_" + uuid.uuid4().hex[:8]
    first = await NatsMetadataStore(nc, ttl_s=2.0, bucket=bucket).open()
    later = await NatsMetadataStore(nc, ttl_s=30.0, bucket=bucket).open()
    assert first.ttl_s == pytest.approx(2.0) and later.ttl_s == pytest.approx(2.0)
    engine = TransferEngine("ttl-" + uuid.uuid4().hex[:8], SECRET, later, heartbeat_s=60)
    await engine.start()
    try:
        # Refreshed every TTL/3 whatever was asked, so the descriptor never lapses while the engine lives.
        for _ in range(4):
            await asyncio.sleep(1.0)
            assert await later.get(engine.segment_name) is not None
    finally:
        await engine.close()
