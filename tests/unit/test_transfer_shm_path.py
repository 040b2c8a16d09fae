"""The engine's shm path in one process: batched copies, misaligned local buffers, per-request outcomes."""

import asyncio

import numpy as np

from tsukimi.transfer.batch import Batch, Op, Status, TransferRequest
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import MemoryMetadataStore
from tsukimi.transfer.shm_peer import copy_bytes


def test_copy_bytes_whatever_the_alignment():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros((1 << 20) + 64, dtype=np.uint8)
    for length in (1, 100, 4096, 300_001):
        for s, d in ((0, 0), (0, 16), (16, 0), (3, 61), (64, 0)):
            dst[:] = 0
            copy_bytes(dst[d:d + length], src[s:s + length])
            assert np.array_equal(dst[d:d + length], src[s:s + length])
            assert not dst[:d].any() and not dst[d + length:].any()


def test_on_pieces_is_on_slice_in_bulk():
    requests = [TransferRequest(Op.WRITE, None, 0, "s", 1, 0, 10) for _ in range(3)]
    batch = Batch(requests)
    batch.start_many([(0, 2), (1, 1), (2, 1)], "shm")
    batch.on_pieces([(0, 4, ""), (1, 10, ""), (2, 0, "boom")])
    st = batch.snapshot()
    assert [s.status for s in st] == [Status.PENDING, Status.COMPLETED, Status.FAILED]
    assert st[0].transferred_bytes == 4 and st[2].error == "boom" and not batch.is_done
    batch.on_pieces([(0, 6, ""), (2, 10, "")])  # a piece after its request failed changes nothing
    st = batch.final_statuses()
    assert batch.is_done and st[0].status == Status.COMPLETED and st[0].transferred_bytes == 10
    assert st[2].status == Status.FAILED and st[2].transferred_bytes == 0


async def _round_trip(block: int, num: int, offset: int, batch_size: int, inline_copy_bytes: int = 4 << 20) -> None:
    metadata = MemoryMetadataStore()
    target = await TransferEngine("target", b"s", metadata, transports=("shm",)).start()
    engine = await TransferEngine("initiator", b"s", metadata, transports=("shm",), shm_slice_bytes=1 << 20,
                                  inline_copy_bytes=inline_copy_bytes).start()
    try:
        remote = target.allocate(block * num + 4096)
        await target.publish()
        # NOTE: local arrays `offset` bytes past an aligned start: numpy's large allocations are 16 bytes past a page
        # while shared memory starts on one (the slow case of memmove).
        raw = np.random.default_rng(2).integers(0, 256, block * num + offset, dtype=np.uint8)
        data = raw[offset:]
        back_raw = np.zeros(block * num + offset, dtype=np.uint8)
        back = back_raw[offset:]
        src, dst = engine.register(data, read_only=True), engine.register(back)
        for op, local in ((Op.WRITE, src), (Op.READ, dst)):
            for start in range(0, num, batch_size):
                requests = [TransferRequest(op, local, i * block, "target", remote.buffer_id, 4096 + i * block, block)
                            for i in range(start, min(start + batch_size, num))]
                statuses = await engine.transfer(requests)
                assert all(s.status == Status.COMPLETED and s.transport == "shm" and s.transferred_bytes == block
                           for s in statuses)
        assert np.array_equal(back, data)
        assert np.array_equal(np.frombuffer(remote.view, dtype=np.uint8)[4096:], data)
        # Bad requests in a batch fail alone; the others still move.
        statuses = await engine.wait(await engine.submit([
            TransferRequest(Op.READ, dst, 0, "target", remote.buffer_id, 0, block),
            TransferRequest(Op.READ, dst, 0, "target", remote.buffer_id, remote.length, block),
            TransferRequest(Op.READ, src, 0, "target", remote.buffer_id, 0, block),
            TransferRequest(Op.READ, dst, 0, "nobody", 1, 0, block)]))
        assert [s.status for s in statuses] == [Status.COMPLETED, Status.FAILED, Status.FAILED, Status.FAILED]
        assert "exceeds" in statuses[1].error and "read-only" in statuses[2].error
    finally:
        await engine.close()
        await target.close()


def test_shm_batches_small_and_large_blocks_misaligned():
    for inline_copy_bytes in (0, 4 << 20):  # every job on the executor; one job on the submitting thread
        asyncio.run(_round_trip(256 << 10, 40, 16, 32, inline_copy_bytes))  # 2 jobs per batch of 32, 1 for the last 8
        asyncio.run(_round_trip(3 << 20, 4, 5, 3, inline_copy_bytes))  # requests cut into 1 MiB pieces
        asyncio.run(_round_trip(1000, 50, 0, 50, inline_copy_bytes))  # small copies, one job
    asyncio.run(_round_trip(256 << 10, 64, 16, 64, 1 << 20))  # 16 MiB batches: shares above the limit, 2 executor jobs


def test_a_submission_within_the_inline_limit_is_copied_before_submit_returns():
    async def main():
        metadata = MemoryMetadataStore()
        target = await TransferEngine("target", b"s", metadata, transports=("shm",)).start()
        engine = await TransferEngine("initiator", b"s", metadata, transports=("shm",),
                                      inline_copy_bytes=1 << 20).start()
        try:
            remote = target.allocate(4 << 20)
            await target.publish()
            data = np.random.default_rng(3).integers(0, 256, 4 << 20, dtype=np.uint8)
            src = engine.register(data, read_only=True)

            def batch(num_bytes):
                return [TransferRequest(Op.WRITE, src, i, "target", remote.buffer_id, i, 64 << 10)
                        for i in range(0, num_bytes, 64 << 10)]

            small = await engine.submit(batch(1 << 20))  # one job, within the limit: copied by submit itself
            assert all(s.status == Status.COMPLETED for s in engine.status(small))
            await engine.wait(small)
            statuses = await engine.wait(await engine.submit(batch(4 << 20)))  # 2 MiB shares: both on the executor
            assert all(s.status == Status.COMPLETED for s in statuses)
            assert np.array_equal(np.frombuffer(remote.view, dtype=np.uint8), data)
        finally:
            await engine.close()
            await target.close()

    asyncio.run(main())


def test_stream_copy_is_built_and_exact_around_its_threshold_and_page_groups():
    from tsukimi.transfer import _stream_copy

    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, 1 << 21, dtype=np.uint8)
    dst = np.zeros((1 << 21) + 128, dtype=np.uint8)
    threshold = _stream_copy.STREAM_MIN_BYTES
    # Below, at and above the threshold; 4-page groups (16 KiB) whole, plus or minus a tail; odd alignments.
    for length in (threshold - 1, threshold, threshold + 1, 4 * 4096 * 9, 4 * 4096 * 9 + 4095, (1 << 21) - 77):
        for s, d in ((0, 0), (0, 16), (5, 61), (64, 3)):
            dst[:] = 0
            _stream_copy.copy(dst[d:d + length], src[s:s + length])
            assert np.array_equal(dst[d:d + length], src[s:s + length])
            assert not dst[:d].any() and not dst[d + length:].any()


def test_stream_copy_refuses_bad_buffers_and_moves_overlapping_ones():
    import pytest

    from tsukimi.transfer import _stream_copy

    with pytest.raises(ValueError, match="destination has 10 bytes, source 11"):
        _stream_copy.copy(bytearray(10), bytes(11))
    with pytest.raises(TypeError):
        _stream_copy.copy(bytes(10), bytes(10))  # read-only destination
    data = np.arange(1 << 18, dtype=np.uint32).view(np.uint8)
    expected = data[:len(data) - 4096].copy()
    _stream_copy.copy(data[4096:], data[:len(data) - 4096])  # overlapping: a memmove
    assert np.array_equal(data[4096:], expected)


def test_stream_copy_at_offsets_is_exact_and_refuses_ranges_outside_either_buffer():
    import pytest

    from tsukimi.transfer import _stream_copy

    rng = np.random.default_rng(4)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(1 << 20, dtype=np.uint8)
    for dst_offset, src_offset, n in ((0, 0, 1 << 20), (5, 61, 300_001), (4096, 0, 65536), (3, 7, 1)):
        dst[:] = 0
        _stream_copy.copy_at(dst, dst_offset, src, src_offset, n)
        assert np.array_equal(dst[dst_offset:dst_offset + n], src[src_offset:src_offset + n])
        assert not dst[:dst_offset].any() and not dst[dst_offset + n:].any()
    for dst_offset, src_offset, n in ((1, 0, 1 << 20), (0, 1, 1 << 20), (-1, 0, 10), (0, 0, -1)):
        with pytest.raises(ValueError, match="out of range"):
            _stream_copy.copy_at(dst, dst_offset, src, src_offset, n)
