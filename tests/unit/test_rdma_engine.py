"""The engine's rdma transport end to end in one process: two engines over the in-process pyverbs stand-ins of
fake_verbs.py (RC QPs that memmove), with the control path over the engines' real TCP servers.

Both engines are on this host, where shm (or tcp) would win, so most tests force rdma.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import msgspec
import numpy as np
import pytest

from tsukimi.transfer import engine as engine_module
from tsukimi.transfer import peers as peers_module
from tsukimi.transfer import rdma, rdma_peer, wire
from tsukimi.transfer.batch import Op, Status, TransferRequest
from tsukimi.transfer.engine import TransferEngine, TransferError
from tsukimi.transfer.metadata import MemoryMetadataStore

from .fake_verbs import _fake_verbs

SECRET = b"rdma-engine-test-secret"
RDMA = ("shm", "rdma", "tcp")
SIZE = (1 << 20) + 123
# The stand-in device's max message size: larger requests go as several work requests.
MAX_MESSAGE = 1 << 16

AVAILABLE, REASON = rdma.probe()


@pytest.fixture
def verbs(monkeypatch, tmp_path):
    verbs = _fake_verbs()
    (tmp_path / "fake0").mkdir()
    monkeypatch.setattr(rdma, "SYSFS_DEVICES", tmp_path)
    monkeypatch.setattr(rdma, "_load", lambda: verbs)
    monkeypatch.delenv("TSUKIMI_RDMA_DEVICE", raising=False)
    monkeypatch.delenv("TSUKIMI_RDMA_GID_INDEX", raising=False)
    monkeypatch.delenv("TSUKIMI_TRANSFER_TRANSPORT", raising=False)
    assert rdma.probe() == (True, "RDMA devices: fake0")
    yield verbs
    assert all(item.freed for item in verbs.work)


async def _engines(store=None, timeout_s: float = 2.0, force: str | None = "rdma", target_transports=RDMA):
    store = store or MemoryMetadataStore()
    target = await TransferEngine("rdma-target", SECRET, store, transports=target_transports, timeout_s=timeout_s,
                                  heartbeat_s=3600).start()
    initiator = await TransferEngine("rdma-init", SECRET, store, transports=RDMA, force_transport=force,
                                     timeout_s=timeout_s, heartbeat_s=3600).start()
    return store, target, initiator


@pytest.fixture
async def pair(verbs):
    store, target, initiator = await _engines()
    yield store, target, initiator
    await initiator.close()
    await target.close()


def _random(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


async def test_descriptors_advertise_rdma(pair):
    _, target, initiator = pair
    for engine in (target, initiator):
        d = engine.descriptor()
        assert d.transports == ["shm", "rdma", "tcp"] and d.rdma_device == "fake0"


async def test_write_then_read_round_trips_byte_exact(pair):
    _, target, initiator = pair
    shared, private = target.allocate(SIZE), target.register(bytearray(SIZE))
    await target.publish()
    src, dst = _random(SIZE, 1), np.zeros(SIZE, dtype=np.uint8)
    local_src, local_dst = initiator.register(src, read_only=True), initiator.register(dst)
    for remote in (shared, private):
        for length, local_off, remote_off in [(1, 0, 0), (7, 3, 5), (4095, 11, 4097), (MAX_MESSAGE + 1, 1, 99),
                                              (3 * MAX_MESSAGE + 11, 17, 12345), (SIZE - 20, 7, 13)]:
            dst[:] = 0
            statuses = await initiator.transfer([TransferRequest(Op.WRITE, local_src, local_off, "rdma-target",
                                                                 remote.buffer_id, remote_off, length)])
            assert statuses[0].transport == "rdma" and statuses[0].transferred_bytes == length
            assert bytes(remote.view[remote_off:remote_off + length]) == src[local_off:local_off + length].tobytes()
            await initiator.read(local_dst, 5, "rdma-target", remote.buffer_id, remote_off, length)
            assert np.array_equal(dst[5:5 + length], src[local_off:local_off + length]), (length, local_off)
            assert not dst[:5].any() and not dst[5 + length:].any()


async def test_many_requests_and_concurrent_batches_respect_the_send_queue(verbs, monkeypatch):
    monkeypatch.setattr(rdma_peer, "MAX_SEND_WR", 4)
    _, target, initiator = await _engines()
    try:
        size = 16 << 20
        remote = target.register(bytearray(size))
        await target.publish()
        rng = np.random.default_rng(2)
        src, dst = _random(size, 3), np.zeros(size, dtype=np.uint8)
        local_src, local_dst = initiator.register(src), initiator.register(dst)
        quarters, at = [], 0
        for _ in range(4):
            pieces = []
            for _ in range(60):
                n = int(rng.integers(1, 2 * MAX_MESSAGE + 100))
                pieces.append((at, n))
                at += n
            quarters.append(pieces)
        assert at <= size

        async def run(op, local, pieces):
            return await initiator.transfer([TransferRequest(op, local, off, "rdma-target", remote.buffer_id, off, n)
                                             for off, n in pieces])

        results = await asyncio.gather(*[run(Op.WRITE, local_src, p) for p in quarters])
        assert all(st.status == Status.COMPLETED and st.transport == "rdma" for r in results for st in r)
        assert bytes(remote.view[:at]) == src[:at].tobytes()
        await asyncio.gather(*[run(Op.READ, local_dst, p) for p in quarters])
        assert np.array_equal(dst[:at], src[:at])
        assert initiator._peers["rdma-target"].rdma._conn.max_send_wr == 4
    finally:
        await initiator.close()
        await target.close()


async def test_out_of_bounds_is_refused_before_posting(pair):
    store, target, initiator = pair
    remote = target.register(bytearray(4096))
    await target.publish()
    local = initiator.register(np.ones(8192, dtype=np.uint8))
    batch = await initiator.submit([TransferRequest(Op.WRITE, local, 0, "rdma-target", remote.buffer_id, 4090, 10),
                                    TransferRequest(Op.READ, local, 0, "rdma-target", remote.buffer_id, 4096, 1)])
    statuses = await initiator.wait(batch)
    assert all(st.status == Status.FAILED and "exceeds" in st.error for st in statuses)
    # A stale or forged descriptor that claims a larger buffer: the rdma transport's own check (against the
    # region the target reported) still refuses, and nothing is written.
    await initiator.write(local, 0, "rdma-target", remote.buffer_id, 0, 16)
    forged = target.descriptor()
    forged.buffers = [msgspec.structs.replace(b, length=8192) for b in forged.buffers]
    await store.put(forged)
    await initiator.open_segment("rdma-target", refresh=True)
    with pytest.raises(TransferError, match=r"rdma WRITE refused: remote range \[4090, 4110\) is outside the "
                                            r"region of 4096 bytes"):
        await initiator.write(local, 0, "rdma-target", remote.buffer_id, 4090, 20)
    assert bytes(remote.view) == b"\1" * 16 + bytes(4080)


async def test_read_only_region_refused_by_the_initiator_then_by_the_target_nic(pair):
    store, target, initiator = pair
    frozen = target.register(bytearray(b"z" * 4096), read_only=True)
    other = target.register(bytearray(4096))
    await target.publish()
    local, back = initiator.register(np.ones(4096, dtype=np.uint8)), initiator.register(bytearray(4096))
    await initiator.read(back, 0, "rdma-target", frozen.buffer_id, 0, 4096)
    assert bytes(back.view) == b"z" * 4096
    # A descriptor claiming it is writable: the initiator still knows better from the target's reply...
    forged = target.descriptor()
    forged.buffers = [msgspec.structs.replace(b, is_writable=True) if b.buffer_id == frozen.buffer_id else b
                      for b in forged.buffers]
    await store.put(forged)
    await initiator.open_segment("rdma-target", refresh=True)
    with pytest.raises(TransferError, match="read-only"):
        await initiator.write(local, 0, "rdma-target", frozen.buffer_id, 0, 16)
    # ...and when that check is skipped too, the target's region has no remote-write access: the completion
    # fails (the NIC's verdict), and requests behind it on the same QP are retried on a new one.
    await initiator.read(back, 0, "rdma-target", frozen.buffer_id, 0, 8)
    peer = initiator._peers["rdma-target"].rdma
    region, _ = peer._regions[frozen.buffer_id]
    peer._regions[frozen.buffer_id] = (region, True)
    batch = await initiator.submit([TransferRequest(Op.WRITE, local, 0, "rdma-target", frozen.buffer_id, 0, 16)]
                                   + [TransferRequest(Op.WRITE, local, 0, "rdma-target", other.buffer_id, i * 64, 64)
                                      for i in range(20)])
    statuses = await initiator.wait(batch)
    assert statuses[0].status == Status.FAILED
    assert statuses[0].error.endswith("failed: IBV_WC_REM_ACCESS_ERR (vendor error 0x0)"), statuses[0]
    assert all(st.status == Status.COMPLETED for st in statuses[1:]), statuses
    assert bytes(frozen.view) == b"z" * 4096 and bytes(other.view[:1280]) == b"\1" * 1280


async def test_a_buffer_unregistered_under_a_peer_fails_remotely_then_is_unknown(pair):
    _, target, initiator = pair
    remote = target.register(bytearray(4096))
    await target.publish()
    local = initiator.register(np.ones(4096, dtype=np.uint8))
    await initiator.write(local, 0, "rdma-target", remote.buffer_id, 0, 64)
    # Withdrawn without republishing: the initiator still uses the old rkey, which the target deregistered.
    target.unregister(remote)
    with pytest.raises(TransferError, match="FAILED: rdma WRITE at .* failed: IBV_WC_REM_ACCESS_ERR"):
        await initiator.write(local, 0, "rdma-target", remote.buffer_id, 0, 64)
    # On a new connection the target no longer lists it.
    with pytest.raises(TransferError, match=f"has no buffer {remote.buffer_id} registered for rdma"):
        await initiator.write(local, 0, "rdma-target", remote.buffer_id, 0, 64)


async def test_a_buffer_registered_after_connecting_is_found(pair):
    _, target, initiator = pair
    first = target.register(bytearray(64))
    await target.publish()
    local = initiator.register(np.full(64, 7, dtype=np.uint8))
    await initiator.write(local, 0, "rdma-target", first.buffer_id, 0, 64)
    later = target.register(bytearray(64))
    await target.publish()
    await initiator.open_segment("rdma-target", refresh=True)
    await initiator.write(local, 0, "rdma-target", later.buffer_id, 0, 64)
    assert bytes(later.view) == b"\7" * 64
    assert initiator._peers["rdma-target"].rdma is not None  # same connection: nothing failed


async def test_no_completion_in_time_is_a_timeout_then_the_next_connection_works(verbs, monkeypatch):
    _, target, initiator = await _engines(timeout_s=0.3)
    try:
        remote = target.register(bytearray(4096))
        await target.publish()
        local = initiator.register(np.ones(4096, dtype=np.uint8))
        monkeypatch.setattr(verbs.QP, "post_send", lambda self, wr: None)  # posted, never completes
        batch = await initiator.submit([TransferRequest(Op.WRITE, local, 0, "rdma-target", remote.buffer_id, 0, 8)])
        [st] = await initiator.wait(batch, timeout_s=5)
        assert st.status == Status.TIMEOUT and "no completion within 0.3s" in st.error, st
        monkeypatch.undo()
        await initiator.write(local, 0, "rdma-target", remote.buffer_id, 0, 8)
        assert bytes(remote.view[:8]) == b"\1" * 8
    finally:
        await initiator.close()
        await target.close()


async def test_a_lost_target_fails_the_request(verbs):
    _, target, initiator = await _engines()
    try:
        remote = target.register(bytearray(4096))
        await target.publish()
        local = initiator.register(np.ones(4096, dtype=np.uint8))
        await initiator.write(local, 0, "rdma-target", remote.buffer_id, 0, 8)
        await target.close()
        with pytest.raises(TransferError, match="FAILED: rdma connection to .* failed: .*refused"):
            await initiator.write(local, 0, "rdma-target", remote.buffer_id, 0, 8)
    finally:
        await initiator.close()


async def test_rdma_is_chosen_for_another_host_and_skipped_on_this_one(verbs, monkeypatch, caplog):
    _, target, initiator = await _engines(force=None)
    try:
        shared, private = target.allocate(4096), target.register(bytearray(4096))
        await target.publish()
        local = initiator.register(np.ones(4096, dtype=np.uint8))
        caplog.set_level(logging.INFO, logger="tsukimi.transfer.peers")
        [st] = await initiator.transfer([TransferRequest(Op.WRITE, local, 0, "rdma-target", shared.buffer_id, 0, 8)])
        assert st.transport == "shm"
        [st] = await initiator.transfer([TransferRequest(Op.WRITE, local, 0, "rdma-target", private.buffer_id, 0, 8)])
        assert st.transport == "tcp"
        assert "use tcp (shm: buffer 2 is private memory, not shared; rdma: peer is on this host)" in caplog.text
        # The same target seen from another host: rdma, logged once per buffer.
        monkeypatch.setattr(engine_module, "local_host_id", lambda: "elsewhere/boot")
        monkeypatch.setattr(peers_module, "local_host_id", lambda: "elsewhere/boot")
        await initiator.open_segment("rdma-target", refresh=True)
        initiator._peers["rdma-target"].choices.clear()
        for _ in range(2):
            for buffer in (shared, private):
                [st] = await initiator.transfer([TransferRequest(Op.WRITE, local, 0, "rdma-target",
                                                                 buffer.buffer_id, 16, 8)])
                assert st.transport == "rdma"
        assert caplog.text.count("use rdma (shm: peer is on another host)") == 2
        assert bytes(private.view[16:24]) == bytes(shared.view[16:24]) == b"\1" * 8
    finally:
        await initiator.close()
        await target.close()


async def test_forced_rdma_never_falls_back(verbs):
    _, target, initiator = await _engines(target_transports=("shm", "tcp"))
    try:
        remote = target.register(bytearray(64))
        await target.publish()
        local = initiator.register(np.ones(64, dtype=np.uint8))
        with pytest.raises(TransferError, match="no transport reaches rdma-target: rdma: peer does not offer it"):
            await initiator.write(local, 0, "rdma-target", remote.buffer_id, 0, 8)
        # Its server refuses rdma control requests too.
        host, port = target.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            wire.client_handshake(sock, SECRET)
            sock.sendall(wire.REQUEST.pack(wire.OP_RDMA_REGIONS, 0, 1, 0, 0))
            _, status, n = wire.RESPONSE.unpack(wire.recv_exact(sock, wire.RESPONSE.size))
            assert (status, wire.recv_exact(sock, n)) == (wire.STATUS_REFUSED, b"this engine does not offer rdma")
    finally:
        await initiator.close()
        await target.close()


async def test_memory_rdma_cannot_register_is_refused_with_the_reason(pair, caplog):
    _, target, initiator = pair
    remote = target.register(bytearray(64))
    await target.publish()
    caplog.set_level(logging.WARNING, logger="tsukimi.transfer.buffers")
    local = initiator.register(b"immutable bytes!")
    assert local.mr is None and "is not registered for rdma: buffer is read-only" in caplog.text
    with pytest.raises(TransferError, match=f"local buffer {local.buffer_id} is not registered for rdma"):
        await initiator.write(local, 0, "rdma-target", remote.buffer_id, 0, 16)


@pytest.mark.skipif(AVAILABLE, reason="this machine has an RDMA device")
async def test_without_rdma_the_engine_starts_without_it_and_forced_rdma_says_why(monkeypatch):
    monkeypatch.delenv("TSUKIMI_TRANSFER_TRANSPORT", raising=False)
    store = MemoryMetadataStore()
    target = await TransferEngine("plain-target", SECRET, store, transports=RDMA).start()
    forced = await TransferEngine("forced-init", SECRET, store, force_transport="rdma").start()
    try:
        assert target.descriptor().transports == ["shm", "tcp"] and target.descriptor().rdma_device == ""
        assert forced.descriptor().transports == ["shm", "tcp"]
        remote = target.register(bytearray(64))
        await target.publish()
        local = forced.register(bytearray(64))
        with pytest.raises(TransferError, match=f"rdma: unavailable here: {REASON}"):
            await forced.write(local, 0, "plain-target", remote.buffer_id, 0, 8)
    finally:
        await forced.close()
        await target.close()
