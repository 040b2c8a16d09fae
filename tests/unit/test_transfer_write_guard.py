"""A buffer's write guard: writes land only in units owned by the tag they carry, over shm and over tcp."""

import asyncio

import numpy as np
import pytest

from tsukimi.transfer.batch import Op, Status, TransferRequest
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import MemoryMetadataStore
from tsukimi.transfer.write_guard import WriteGuard

UNIT = 4096


def test_guard_assigns_clears_and_explains_refusals():
    guard = WriteGuard(3 * UNIT + 1, UNIT)  # a partial last unit still has an owner entry
    try:
        assert guard.num_units == 4 and [guard.owner(u) for u in range(4)] == [0, 0, 0, 0]
        guard.assign([0, 1], 7)
        guard.assign([3], 9)
        assert [guard.owner(u) for u in range(4)] == [7, 7, 0, 9]
        assert guard.refusal(0, 2 * UNIT, 7) == ""
        assert guard.refusal(UNIT + 10, 5, 7) == ""
        assert guard.refusal(3 * UNIT, 1, 9) == ""
        assert guard.refusal(UNIT, UNIT + 1, 7) == (
            f"unit 2 of {UNIT} bytes is free, not the writer's (tag 0x7): write refused")
        assert guard.refusal(3 * UNIT, 1, 7) == (
            f"unit 3 of {UNIT} bytes is owned by another writer, not the writer's (tag 0x7): write refused")
        assert guard.refusal(0, 1, 0) == "the buffer is write-guarded and the write carries no owner tag"
        guard.clear([0])
        assert guard.refusal(UNIT - 1, 2, 7).startswith("unit 0 ")
        with pytest.raises(ValueError, match="nonzero"):
            guard.assign([2], 0)
    finally:
        guard.close()


async def _guarded_writes(transport: str) -> None:
    metadata = MemoryMetadataStore()
    target = await TransferEngine("target", b"s", metadata).start()
    engine = await TransferEngine("writer", b"s", metadata, force_transport=transport).start()
    try:
        remote = target.allocate(4 * UNIT)
        guard = target.guard(remote, UNIT)
        await target.publish()
        assert (await engine.open_segment("target")).buffer(remote.buffer_id).guard_unit_bytes == UNIT
        guard.assign([0, 1], 7)
        guard.assign([2], 9)
        data = np.arange(4 * UNIT, dtype=np.uint32).astype(np.uint8)
        src = engine.register(data, read_only=True)
        memory = np.frombuffer(remote.view, dtype=np.uint8)

        async def write(offset: int, length: int, tag: int):
            return (await engine.wait(await engine.submit([TransferRequest(
                Op.WRITE, src, offset, "target", remote.buffer_id, offset, length, tag)])))[0]

        ok = await write(0, 2 * UNIT, 7)
        assert (ok.status, ok.transport, ok.transferred_bytes) == (Status.COMPLETED, transport, 2 * UNIT)
        assert np.array_equal(memory[:2 * UNIT], data[:2 * UNIT])
        spanning = await write(UNIT, 2 * UNIT, 7)  # its second unit belongs to tag 9
        assert spanning.status == Status.FAILED and "unit 2 of 4096 bytes is owned by another writer" in spanning.error
        assert not memory[2 * UNIT:].any()
        untagged = await write(3 * UNIT, UNIT, 0)
        assert untagged.status == Status.FAILED and "carries no owner tag" in untagged.error
        guard.clear([0, 1])
        memory[:2 * UNIT] = 0
        stale = await write(0, UNIT, 7)
        assert stale.status == Status.FAILED and "unit 0 of 4096 bytes is free" in stale.error
        assert not memory.any()
        # Reads are not guarded.
        memory[:] = 5
        back = engine.register(np.zeros(UNIT, dtype=np.uint8))
        await engine.read(back, 0, "target", remote.buffer_id, 0, UNIT)
        assert (np.frombuffer(back.view, dtype=np.uint8) == 5).all()
    finally:
        await engine.close()
        await target.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_writes_land_only_in_units_their_tag_owns(transport):
    asyncio.run(_guarded_writes(transport))
