"""`PoolClient` over a gRPC session to a real CacheStore servicer: refusals, timeouts and cancelled callers leave
the stream working, a put start's `done` is applied after its reply, and a session to a former master, closed, or
whose server stops fails its waiting operations."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tsukimi.proto import cachestore_pb2 as pb

from tests.unit.pool_client_fakes import KEYS, env, leased, visible  # noqa: F401

session_only = pytest.mark.parametrize("env", ["session"], indirect=True)


async def gets_held_by_a_busy_master(env, num: int = 3) -> list[asyncio.Future]:
    """`num` session gets sent while the caller holds the pool's lock (the master cannot answer them yet)."""
    waiting = [asyncio.ensure_future(env.session.BatchGet(pb.KeysRequest(keys=KEYS[:1]), 5.0)) for _ in range(num)]
    await asyncio.sleep(0.05)
    return waiting


@session_only
async def test_session_refusal_fails_that_operation_and_the_next_opens_a_new_stream(env):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.session.BatchPutStart(pb.BatchPutStartRequest(puts=[pb.PutStartRequest(key=b"k", size=0)]), 2.0)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "positive size" in refused.value.details() and env.session.num_waiting == 0
    c = env.client()
    assert await env.put(c, range(2)) == [True, True]
    await c.flush()
    assert visible(env.master) == set(KEYS[:2])
    await c.close()


@session_only
async def test_session_timeout_drops_the_late_answer_and_goes_on(env):
    c = env.client()
    async with env.pool._lock:  # the master is busy: the get cannot be answered yet
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await env.session.BatchGet(pb.KeysRequest(keys=KEYS[:1]), 0.05)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and env.session.num_waiting == 0
    # The stream still works; the late answer (a miss) went nowhere.
    assert await env.put(c, range(1)) == [True]
    await c.flush()
    assert await env.get(c, range(1)) == [True]
    await c.close()


@session_only
async def test_session_applies_a_put_starts_done_after_its_reply_and_before_the_next_message(env):
    c = env.client()
    assert await env.put(c, range(4)) == [True] * 4
    assert await env.put(c, range(4, 8)) == [True] * 4  # carried the first batch's ends, applied after the reply
    # The next message sees them applied: a get of the first batch (carrying the second batch's ends, applied
    # before it) finds all eight, and leases them.
    assert await env.get(c, range(8)) == [True] * 8
    assert visible(env.master) == set(KEYS[:8]) and leased(env.master) == set(KEYS[:8])
    # The releases a get carries are applied after its reply: the next message finds them given back.
    assert await env.get(c, range(8, 8)) == []
    await env.session.BatchPutEnd(pb.KeysRequest(), 2.0)  # any message: read after the releases were applied
    assert leased(env.master) == set()
    assert env.stub.calls == {"BatchPutStart": 2, "BatchGet": 2}
    await c.close()


@session_only
async def test_a_cancelled_session_caller_leaves_the_stream_working(env):
    c = env.client()
    async with env.pool._lock:  # the master is busy: the get cannot be answered yet
        waiting = asyncio.ensure_future(env.session.BatchGet(pb.KeysRequest(keys=KEYS[:1]), 5.0))
        await asyncio.sleep(0.05)
        assert env.session.num_waiting == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert env.session.num_waiting == 0
    # Its late answer goes nowhere; the next operations are answered on the same stream, in order.
    assert await env.put(c, range(1)) == [True]
    await c.flush()
    assert await env.get(c, range(1)) == [True]
    await c.close()


@session_only
async def test_session_to_an_instance_that_is_no_longer_master_fails_unavailable(env):
    env.servicer.use(None, master_hint="b")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.session.BatchGet(pb.KeysRequest(keys=KEYS[:1]), 2.0)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "ask b" in refused.value.details()
    env.servicer.use(env.pool)
    got = await env.session.BatchGet(pb.KeysRequest(keys=KEYS[:1]), 2.0)
    assert [g.found for g in got.gets] == [False]


@session_only
async def test_session_closed_with_operations_waiting_fails_them_and_refuses_more(env):
    async with env.pool._lock:
        waiting = await gets_held_by_a_busy_master(env)
        assert env.session.num_waiting == 3
        await env.session.close()
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 2.0)
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.CANCELLED for r in results)
    with pytest.raises(grpc.aio.AioRpcError):
        await env.session.BatchGet(pb.KeysRequest(keys=KEYS[:1]), 1.0)


@session_only
async def test_session_operations_waiting_when_the_server_stops_fail_in_time(env):
    async with env.pool._lock:
        waiting = await gets_held_by_a_busy_master(env)
        await env.server.stop(None)
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 2.0)
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results), results
    assert env.session.num_waiting == 0
