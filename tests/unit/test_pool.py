"""The pool master at run time, over a real DRAM segment and a real SSD tier (no broker): the byte movements
each operation settles, in the right order, and the events it publishes. Exact expectations."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tsukimi.cachestore.master import PoolMaster
from tsukimi.cachestore.member import LocalMember
from tsukimi.cachestore.pool import Instance, Pool, PutSpec
from tsukimi.cachestore.ssd_tier import SsdTier
from tsukimi.kvpool.checksum import block_checksum
from tsukimi.common.messages import BlockRemoved, BlockStored
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import MemoryMetadataStore

BLOCK = 4096
K = [bytes([i]) * 32 for i in range(8)]
DATA = {k: np.full(BLOCK, i + 1, dtype=np.uint8) for i, k in enumerate(K)}


@pytest.fixture
async def setup(tmp_path):
    engine = await TransferEngine("pool-unit", b"secret", MemoryMetadataStore()).start()
    dram = engine.allocate(3 * BLOCK)
    ssd = SsdTier(str(tmp_path / "ssd"), f"sqlite:///{tmp_path / 'index.sqlite'}", "a", 8 * BLOCK)
    events = []
    # Full DRAM evicts only to make room (watermark 100%): three blocks fit.
    pool = Pool(PoolMaster(high_watermark=1.0, evict_share=0.01), publish=events.append)
    await pool.join("a", Instance(LocalMember(engine, dram, ssd), "pool-unit", dram.buffer_id), 3 * BLOCK, 8 * BLOCK)
    yield pool, dram, ssd, events
    await engine.close()
    ssd.close()


async def put(pool, dram, key):
    (replicas,) = await pool.put_start([PutSpec(key, BLOCK, block_checksum(DATA[key]))])
    (replica,) = replicas
    dram.view[replica.offset:replica.offset + BLOCK] = DATA[key].tobytes()  # the client's WRITE
    await pool.put_end([key])
    return replica


def ssd_bytes(ssd, key) -> bytes:
    out = bytearray(BLOCK)
    ssd.read_into(key, memoryview(out))
    return bytes(out)


async def test_demotion_reads_a_range_before_a_promotion_overwrites_it(setup):
    pool, dram, ssd, events = setup
    offsets = [(await put(pool, dram, k)).offset for k in K[:3]]
    assert offsets == [0, BLOCK, 2 * BLOCK]
    # A fourth block: K0 is demoted (its file written from offset 0) before K3 is given offset 0.
    assert (await put(pool, dram, K[3])).offset == 0
    assert ssd_bytes(ssd, K[0]) == DATA[K[0]].tobytes()
    # Getting K0 back: K1 is demoted from offset 4096, then K0 is promoted into that same range.
    ((replicas, lease, checksum),) = await pool.get([K[0]])
    assert [(r.tier, r.offset) for r in replicas] == [("dram", BLOCK)] and checksum == block_checksum(DATA[K[0]])
    assert bytes(dram.view[BLOCK:2 * BLOCK]) == DATA[K[0]].tobytes()
    assert ssd_bytes(ssd, K[1]) == DATA[K[1]].tobytes()
    await pool.release([(K[0], lease)])
    assert [m.seq for m in events] == list(range(1, len(events) + 1))
    flat = [(type(e).__name__, e.key[:1].hex(), e.tier) for m in events for e in m.events]
    assert flat == [
        ("BlockStored", "00", "dram"), ("BlockStored", "01", "dram"), ("BlockStored", "02", "dram"),
        ("BlockRemoved", "00", "dram"), ("BlockStored", "00", "ssd"), ("BlockStored", "03", "dram"),
        ("BlockRemoved", "01", "dram"), ("BlockStored", "01", "ssd"), ("BlockStored", "00", "dram"),
    ]
    snapshot = await pool.snapshot()
    assert snapshot.seq == events[-1].seq
    assert sorted((r.key[:1].hex(), r.tier) for r in snapshot.replicas) == [
        ("00", "dram"), ("00", "ssd"), ("01", "ssd"), ("02", "dram"), ("03", "dram")]


async def test_unreadable_ssd_copy_is_a_miss_and_leaves_the_pool(setup):
    pool, dram, ssd, events = setup
    for k in K[:4]:
        await put(pool, dram, k)  # K0 -> SSD
    path = ssd._path(K[0])
    with open(path, "r+b") as f:
        f.write(b"\xff")
    assert await pool.get([K[0]]) == [None]
    assert await pool.exists([K[0]]) == [False]
    assert K[0] not in ssd and not os.path.exists(path)
    assert isinstance(events[-1].events[-1], BlockRemoved) and events[-1].events[-1].key == K[0]


async def test_removal_deletes_the_ssd_file_and_a_rejoin_keeps_its_blocks(setup):
    pool, dram, ssd, events = setup
    for k in K[:4]:
        await put(pool, dram, k)
    assert K[0] in ssd
    assert await pool.remove([K[0], K[7]]) == [True, False]
    assert K[0] not in ssd
    await put(pool, dram, K[4])  # K1 -> SSD
    member = pool.instances["a"].member
    # The same instance joining again (say, a new master): its SSD blocks are registered again, DRAM forgotten.
    assert await pool.join("a", Instance(member, "pool-unit", dram.buffer_id), 3 * BLOCK, 8 * BLOCK) == 1
    assert await pool.exists(K[:5]) == [False, True, False, False, False]
    ((replicas, lease, _),) = await pool.get([K[1]])
    assert bytes(dram.view[replicas[0].offset:replicas[0].offset + BLOCK]) == DATA[K[1]].tobytes()
    assert isinstance(events[-1].events[-1], BlockStored)


async def test_coalesced_events_go_out_as_one_message_and_a_snapshot_flushes_them_first(setup):
    import asyncio

    pool, dram, _, events = setup
    pool.coalesce_s = 0.05
    await put(pool, dram, K[0])
    await put(pool, dram, K[1])
    assert events == []  # gathered, not sent yet
    await asyncio.sleep(0.1)
    (message,) = events
    assert message.seq == 1 and message.events == [BlockStored(K[0], "a", "dram"), BlockStored(K[1], "a", "dram")]
    await pool.remove([K[0]])
    snapshot = await pool.snapshot()  # sends the pending removal first: the snapshot's seq covers it
    assert [m.seq for m in events] == [1, 2] and events[1].events == [BlockRemoved(K[0], "a", "dram")]
    assert snapshot.seq == 2 and [r.key for r in snapshot.replicas] == [K[1]]
    await asyncio.sleep(0.1)
    assert len(events) == 2  # the timer of the flushed message sends nothing more


async def test_a_prefix_get_stops_at_the_first_miss_and_leases_nothing_after_it(setup):
    pool, dram, ssd, events = setup
    await put(pool, dram, K[0])
    await put(pool, dram, K[2])
    found = await pool.get([K[0], K[1], K[2]], is_prefix=True)
    assert [f is not None for f in found] == [True, False, False]
    # K2 was leased by the lookup and given back: it can be removed, K0 (still leased) cannot.
    assert await pool.remove([K[2], K[0]]) == [True, False]
    await pool.release([(K[0], found[0][1])])
    assert await pool.remove([K[0]]) == [True]
    # Without is_prefix every present key is answered.
    await put(pool, dram, K[2])
    assert [f is not None for f in await pool.get([K[0], K[1], K[2]])] == [False, False, True]
