"""`PoolClient` against a real CacheStore gRPC servicer in this process (no broker): put ends and lease releases
carried on the next call (`done`), the linger flush, `flush` waiting for calls under way, several operations in
flight, and nothing left behind when callers stop mid-pipeline. Exact expectations."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from tsukimi.proto import cachestore_pb2 as pb

from tests.unit.pool_client_fakes import BLOCK, KEYS, NUM, env, leased, settled, visible  # noqa: F401


async def test_put_end_rides_on_the_next_call(env):
    c = env.client()
    assert await env.put(c, range(4)) == [True] * 4
    # Written, but its put end has not gone out: nobody sees the blocks yet.
    assert visible(env.master) == set() and c.num_pending == 4
    assert await env.put(c, range(4, 8)) == [True] * 4
    # The second BatchPutStart carried the first batch's ends: no BatchPutEnd call was made.
    assert await settled(lambda: visible(env.master) == set(KEYS[:4])) and env.stub.calls == {"BatchPutStart": 2}
    await c.flush()
    assert visible(env.master) == set(KEYS[:8]) and c.num_pending == 0
    assert env.stub.calls == {"BatchPutStart": 2, "BatchPutEnd": 1}
    # The bytes in the pool are the ones written.
    assert await env.get(c, range(8)) == [True] * 8
    assert np.array_equal(env.back[:8 * BLOCK], env.data[:8 * BLOCK])
    await c.close()


async def test_release_rides_on_the_next_call_and_blocks_removal_until_then(env):
    c = env.client()
    await env.put(c, range(8))
    await c.flush()
    assert await env.get(c, range(4)) == [True] * 4
    # Leased until the release goes out: the pool refuses to remove the blocks.
    assert leased(env.master) == set(KEYS[:4])
    assert list((await env.raw_stub.BatchRemove(pb.KeysRequest(keys=KEYS[:1]))).removed) == [False]
    assert await env.get(c, range(4, 8)) == [True] * 4
    assert await settled(lambda: leased(env.master) == set(KEYS[4:8])) and env.stub.calls.get("BatchRelease", 0) == 0
    # A call of another kind carries them too: the removal sees the releases applied first.
    removed = await env.stub.BatchRemove(pb.KeysRequest(keys=KEYS[4:6], done=c._take_done()))
    assert list(removed.removed) == [True, True] and leased(env.master) == set()
    await c.close()


async def test_linger_sends_finished_work_alone(env):
    c = env.client(linger_s=0.01)
    await env.put(c, range(2))
    await asyncio.sleep(0.3)
    assert visible(env.master) == set(KEYS[:2]) and c.num_pending == 0
    assert env.stub.calls == {"BatchPutStart": 1, "BatchPutEnd": 1}
    await env.get(c, range(2))
    await asyncio.sleep(0.3)
    assert leased(env.master) == set()
    await c.close()


async def test_flush_waits_for_ends_already_on_their_way(env):
    c = env.client(linger_s=0.001)
    env.stub.delay["BatchPutEnd"] = 0.2
    await env.put(c, range(2))
    await asyncio.sleep(0.05)  # the linger flush has taken the ends; its call is held back
    assert c.num_pending == 0 and visible(env.master) == set()
    await c.flush()
    assert visible(env.master) == set(KEYS[:2])
    await c.close()


async def test_pipelined_batches_move_the_right_bytes(env):
    c = env.client()
    batches = [range(i, i + 2) for i in range(0, NUM, 2)]
    assert await asyncio.gather(*(env.put(c, idx) for idx in batches)) == [[True, True]] * len(batches)
    await c.flush()
    assert visible(env.master) == set(KEYS)
    # No call of its own per batch: the ends went out together (all batches started before any ended).
    assert env.stub.calls["BatchPutStart"] == len(batches) and env.stub.calls.get("BatchPutEnd", 0) <= 1
    assert await asyncio.gather(*(env.get(c, idx) for idx in batches)) == [[True, True]] * len(batches)
    assert np.array_equal(env.back, env.data)
    await c.close()
    assert leased(env.master) == set()


async def test_callers_stopping_mid_pipeline_leave_nothing_behind(env):
    c = env.client()
    batches = [range(i, i + 2) for i in range(0, NUM, 2)]
    puts = [asyncio.ensure_future(env.put(c, idx)) for idx in batches]
    await asyncio.sleep(0)
    await asyncio.sleep(0.002)
    for task in puts:
        task.cancel()
    await asyncio.gather(*puts, return_exceptions=True)
    await c.close()
    # Every block was either put to its end (visible) or never started: none is left invisible, holding space.
    assert all(b.is_visible for b in env.master._blocks.values())
    # The operations ran to their ends although their callers were gone.
    assert visible(env.master) == set(KEYS)
    c = env.client()
    gets = [asyncio.ensure_future(env.get(c, idx)) for idx in batches]
    await asyncio.sleep(0.002)
    for task in gets:
        task.cancel()
    await asyncio.gather(*gets, return_exceptions=True)
    await c.close()
    assert leased(env.master) == set()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.put(c, range(1))
    assert refused.value.code() == grpc.StatusCode.CANCELLED


async def test_a_corrupt_replica_is_reported_and_dropped(env):
    c = env.client()
    await env.put(c, range(2))
    await c.flush()
    (gets,) = [(await env.raw_stub.BatchGet(pb.KeysRequest(keys=KEYS[1:2]))).gets]
    await env.raw_stub.BatchRelease(pb.BatchReleaseRequest(releases=[
        pb.ReleaseRequest(key=KEYS[1], lease_id=gets[0].lease_id)]))
    offset = gets[0].replicas[0].offset
    env.dram.view[offset] = (env.dram.view[offset] + 1) % 256
    assert await env.get(c, range(2)) == [True, False]
    assert visible(env.master) == {KEYS[0]}
    # Unverified reads do not look.
    await env.put(c, range(2, 3))
    await c.flush()
    assert await env.get(c, range(2, 3), verify=False) == [True]
    await c.close()


async def test_batch_put_end_with_only_done_and_unknown_entries(env):
    c = env.client()
    await env.put(c, range(1))
    done = c._take_done()
    # Unknown keys and leases in `done` are ignored, not errors.
    done.put_end_keys.append(b"x" * 32)
    done.releases.add(key=b"y" * 32, lease_id=7)
    await env.raw_stub.BatchPutEnd(pb.KeysRequest(done=done))
    assert visible(env.master) == {KEYS[0]}
    await c.close()
