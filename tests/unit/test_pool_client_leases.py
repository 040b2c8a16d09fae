"""`PoolClient`'s held leases and reserved slots over a session to a real CacheStore servicer: blocks read again
under held leases, bounded and given back when idle or past their term, slot puts with no put start, and neither
leases, slots nor finished work used after the stream ends."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from tsukimi.proto import cachestore_pb2 as pb

from tests.unit.pool_client_fakes import (  # noqa: F401
    BLOCK, KEYS, env, holding, leased, replace_pool, sessions_only, settled, visible,
)

# ---- held leases ---------------------------------------------------------------------------------------------


async def test_held_leases_read_blocks_again_with_no_call_to_the_master(env):
    c = env.client(hold_leases=8)
    await env.put(c, range(4))
    await c.flush()
    assert await env.get(c, range(4)) == [True] * 4
    if env.session is None:
        # Unary calls: no stream tells when the master that gave a lease may have changed, so none is held.
        assert c.hold_leases == 0 and c.num_held == 0
        await c.close()
        return
    assert c.num_held == 4 and await settled(lambda: leased(env.master) == set(KEYS[:4]))
    env.back[:] = 0
    assert await env.get(c, range(4)) == [True] * 4
    assert np.array_equal(env.back[:4 * BLOCK], env.data[:4 * BLOCK])
    # Read under the held leases: one BatchGet in all, and the reads wait to ride on the next call.
    assert env.stub.calls.get("BatchGet") == 1 and c.num_held_reads == 4 and c.num_pending == 4
    # A get of held and other blocks asks the master for the others only.
    await env.put(c, range(4, 6))
    assert await env.get(c, range(6)) == [True] * 6
    assert env.stub.calls["BatchGet"] == 2 and c.num_held == 6 and c.num_held_reads == 8
    assert await settled(lambda: env.pool.num_hits == 4 + 4 + 2)  # the held reads counted as hits
    # Held, the blocks cannot be removed; flush gives the leases back.
    assert list((await env.raw_stub.BatchRemove(pb.KeysRequest(keys=KEYS[:1]))).removed) == [False]
    await c.flush()
    assert c.num_held == 0 and c.num_pending == 0 and leased(env.master) == set()
    assert env.pool.num_hits == 4 + 4 + 2 + 4  # the last four held reads, sent with the flush
    await c.close()


async def test_held_leases_are_bounded_and_go_back_when_idle(env):
    sessions_only(env)
    c = env.client(hold_leases=2, hold_idle_s=0.1, linger_s=0.01)
    await env.put(c, range(4))
    await c.flush()
    assert await env.get(c, range(4)) == [True] * 4
    # The two read last are held; the others went back.
    assert c.num_held == 2 and await settled(lambda: leased(env.master) == set(KEYS[2:4]))
    # Not read again for hold_idle_s: given back (on a call of their own, within the linger).
    assert await settled(lambda: c.num_held == 0 and leased(env.master) == set())
    await c.close()


async def test_a_held_lease_is_not_used_past_its_term(env):
    env.master.lease_s = 1.5  # held for at most 1.5 s less the margin (1 s) from when its get went out
    c = await holding(env, 2, hold_leases=8, hold_idle_s=60.0)
    assert await env.get(c, range(2)) == [True] * 2 and env.stub.calls["BatchGet"] == 1
    await asyncio.sleep(0.6)
    assert await env.get(c, range(2)) == [True] * 2
    assert env.stub.calls["BatchGet"] == 2 and c.num_held_reads == 2  # asked the master again, and holds anew
    env.master.lease_s = 0.5  # shorter than the margin: never held
    await c.flush()
    assert await env.get(c, range(2)) == [True] * 2 and c.num_held == 0
    await c.close()


async def test_held_leases_are_not_used_after_the_stream_ends(env):
    c = await holding(env, 2, hold_leases=8)
    await replace_pool(env)
    # The leases of the pool that went are not read under (its memory is another master's to give out now), nor
    # given back to the new one (its own lease ids may be the same numbers).
    assert await env.get(c, range(2)) == [False, False]
    assert env.stub.calls["BatchGet"] == 2 and c.num_held == 0 and c.num_held_reads == 0
    await c.close()
    assert not env.stub.requests[-1][1].done.releases and c.num_pending == 0


async def test_a_prefix_is_read_under_held_leases_up_to_its_first_block_not_held(env):
    c = await holding(env, 2, hold_leases=8)
    await env.put(c, range(2, 6))
    assert await env.get(c, range(6, 6)) == []  # carries their ends (a flush would give the held leases back)
    assert list((await env.raw_stub.BatchRemove(pb.KeysRequest(keys=KEYS[4:5]))).removed) == [True]
    read = await c.get_many(KEYS[:6], env.dst, [i * BLOCK for i in range(6)], [BLOCK] * 6, is_prefix=True)
    # 0-1 under held leases, 2-3 from the master, and nothing after the gap at 4 (5 is there, but not leased).
    assert read == [True] * 4 + [False] * 2 and c.num_held_reads == 2
    assert c.num_held == 4 and await settled(lambda: leased(env.master) == set(KEYS[:4]))
    await c.close()
    assert leased(env.master) == set()


async def test_a_held_block_that_fails_its_checksum_is_dropped_and_let_go(env):
    c = await holding(env, 2, hold_leases=8)
    offset = c._held[KEYS[1]].replica.offset
    env.dram.view[offset] = (env.dram.view[offset] + 1) % 256
    assert await env.get(c, range(2)) == [True, False]
    assert c.num_held == 1 and visible(env.master) == {KEYS[0]}
    await c.close()


# ---- reserved slots ------------------------------------------------------------------------------------------


async def test_reserved_slots_put_blocks_with_no_put_start(env):
    c = env.client(reserve_bytes=4 * BLOCK)
    assert await env.put(c, range(2)) == [True] * 2
    if env.session is None:
        assert c.reserve_bytes == 0 and env.stub.calls == {"BatchPutStart": 1}
        await c.close()
        return
    # One Reserve for the two blocks and a stock of four (4 * BLOCK); no put start.
    # The master counts the two written ones too, until their ends arrive.
    assert env.stub.calls == {"Reserve": 1} and c.num_slots == 4 and env.master.num_slots == 6
    # Written, ended on the next call: invisible until then.
    assert visible(env.master) == set() and c.num_pending == 2
    # Taken from the stock, down to half: filled again in the background (the reserve carries the four ends).
    assert await env.put(c, range(2, 4)) == [True] * 2
    assert await settled(lambda: c.num_slots == 4) and env.stub.calls == {"Reserve": 2}
    assert await settled(lambda: visible(env.master) == set(KEYS[:4]))
    await c.flush()
    assert env.master.num_slots == 4
    assert await env.get(c, range(4)) == [True] * 4
    assert np.array_equal(env.back[:4 * BLOCK], env.data[:4 * BLOCK])
    assert await env.put(c, range(4, 6)) == [True] * 2
    assert await settled(lambda: c.num_slots == 4) and env.stub.calls["Reserve"] == 3
    assert env.stub.calls.get("BatchPutStart", 0) == 0
    await c.close()
    # Closing gives the stock back; every block written is visible.
    assert env.master.num_slots == 0 and visible(env.master) == set(KEYS[:6])


async def test_a_slot_put_of_a_key_the_pool_holds_keeps_the_first_block(env):
    sessions_only(env)
    c = env.client(reserve_bytes=4 * BLOCK)
    await env.put(c, range(1))
    await c.flush()
    (first,) = env.master.replicas(KEYS[0])
    # Written again into a slot (the writer cannot know the pool holds it); at its end the slot goes back.
    assert await env.put(c, range(1)) == [True]
    await c.flush()
    assert env.master.replicas(KEYS[0]) == [first] and env.master.num_slots == c.num_slots == 3
    # The second copy's room came back: the block and the three slots in stock are all that is allocated.
    assert env.master._tiers[("a", "dram")].allocator.num_free_bytes == env.dram.length - 4 * BLOCK
    await c.close()


async def test_a_stock_not_written_to_goes_back(env):
    sessions_only(env)
    c = env.client(reserve_bytes=4 * BLOCK, hold_idle_s=0.1, linger_s=0.01)
    await env.put(c, range(2))
    assert c.num_slots == 4
    assert await settled(lambda: c.num_slots == 0 and env.master.num_slots == 0)
    assert visible(env.master) == set(KEYS[:2])
    await c.close()


async def test_slots_are_not_written_after_the_stream_ends(env):
    sessions_only(env)
    c = env.client(reserve_bytes=4 * BLOCK)
    await env.put(c, range(1))
    await c.flush()
    offsets = [slot.replica.offset for slot in c._stock[BLOCK]]
    before = [bytes(env.dram.view[o:o + BLOCK]) for o in offsets]
    await replace_pool(env)
    # The old pool's slots are not written (its memory is the new master's to give out): the put asks the new
    # pool, which has no room.
    assert await env.put(c, range(1, 2)) == [False]
    assert [bytes(env.dram.view[o:o + BLOCK]) for o in offsets] == before
    assert c.num_slots == 0 and env.stub.calls["Reserve"] == 2 and env.stub.calls["BatchPutStart"] == 1
    # For a while after a reserve found no room, puts of that size go straight to a put start.
    assert await env.put(c, range(1, 2)) == [False]
    assert env.stub.calls["Reserve"] == 2 and env.stub.calls["BatchPutStart"] == 2
    await c.close()


async def test_reserve_as_a_unary_call_and_its_refusals(env):
    for size, count in ((0, 1), (BLOCK, 0), (BLOCK, 4097)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await env.raw_stub.Reserve(pb.ReserveRequest(size=size, count=count))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = await env.raw_stub.Reserve(pb.ReserveRequest(size=BLOCK, count=2))
    assert len(reply.slots) == 2 and reply.term_s == env.master.put_timeout_s
    slot, spare = reply.slots
    await env.engine.write(env.src, 0, slot.replica.segment, slot.replica.buffer_id, slot.replica.offset, BLOCK)
    done = pb.Done(slot_ends=[pb.SlotEnd(slot_id=slot.slot_id, key=KEYS[0], checksum=env.sums[0])],
                   returned_slots=[spare.slot_id])
    await env.raw_stub.BatchPutEnd(pb.KeysRequest(done=done))
    assert visible(env.master) == {KEYS[0]} and env.master.num_slots == 0
    c = env.client()
    assert await env.get(c, range(1)) == [True] and np.array_equal(env.back[:BLOCK], env.data[:BLOCK])
    await c.close()


async def test_finished_work_of_a_stream_that_ended_is_not_sent_on_the_next(env):
    sessions_only(env)
    c = env.client()
    assert await env.put(c, range(2)) == [True] * 2
    assert await env.get(c, range(2, 2)) == []  # carries the ends: both visible
    assert await env.put(c, range(2, 4)) == [True] * 2
    assert await env.get(c, range(2)) == [True] * 2  # carries the ends of 2-3
    assert c.num_pending == 2  # the two leases to give back, to the master of this stream
    await replace_pool(env)
    # The next call reaches another master (here a new pool): it carries none of them (they would name that
    # master's own puts and leases); the old master expires its leases and revokes its unended puts.
    assert await env.get(c, range(4, 4)) == []
    name, request = env.stub.requests[-1]
    assert name == "BatchGet" and not request.HasField("done") and c.num_pending == 0
    await c.close()
