"""`PoolClient` against a real CacheStore gRPC servicer in this process (no broker): put ends and lease releases
carried on the next call (`done`), the linger flush, `flush` waiting for calls under way, several operations in
flight, and nothing left behind when callers stop mid-pipeline. Exact expectations."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from tsukimi.cachestore.master import PoolMaster
from tsukimi.cachestore.member import LocalMember
from tsukimi.cachestore.pool import Instance, Pool
from tsukimi.cachestore.servicer import CacheStoreServicer
from tsukimi.cachestore.session_lane import SessionLane
from tsukimi.kvpool.checksum import block_checksum
from tsukimi.kvpool.pool_client import PoolClient
from tsukimi.kvpool.pool_session import PoolSession
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import MemoryMetadataStore

BLOCK = 64 << 10
NUM = 16
KEYS = [bytes([i]) * 32 for i in range(NUM)]


class CountingStub:
    """The real stub, counting calls per method; `delay[method]` seconds before a call goes out. Over a session,
    `transports` collects how its answered calls went ("lane" or "grpc")."""

    def __init__(self, stub):
        self._stub = stub
        self.calls: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.transports: set[str] = set()
        # (method, request) of every call, in order.
        self.requests: list[tuple[str, object]] = []

    def __getattr__(self, name):
        method = getattr(self._stub, name)
        if not callable(method):
            return method  # NOTE: a session's `epoch`, say.

        async def call(request, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            self.requests.append((name, request))
            if name in self.delay:
                await asyncio.sleep(self.delay[name])
            reply = await method(request, **kwargs)
            if isinstance(self._stub, PoolSession) and self._stub.transport:
                self.transports.add(self._stub.transport)
            return reply

        return call


@pytest.fixture(params=["unary", "session", "lane"])
async def env(request):
    metadata = MemoryMetadataStore()
    store_engine = await TransferEngine("pool", b"s", metadata, transports=("shm",)).start()
    dram = store_engine.allocate(4 * NUM * BLOCK)
    await store_engine.publish()
    master = PoolMaster()
    pool = Pool(master)
    await pool.join("a", Instance(LocalMember(store_engine, dram, None), "pool", dram.buffer_id), dram.length, 0)
    server = grpc.aio.server()
    servicer = CacheStoreServicer(pool)
    pb_grpc.add_CacheStoreServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    engine = await TransferEngine("client", b"s", metadata, transports=("shm",)).start()
    data = np.random.default_rng(1).integers(0, 256, NUM * BLOCK, dtype=np.uint8)
    back = np.zeros_like(data)
    src, dst = engine.register(data, read_only=True), engine.register(back)
    raw_stub = pb_grpc.CacheStoreStub(channel)
    lane = None
    if request.param == "lane":
        lane = await SessionLane(servicer, b"s", "127.0.0.1", 0).start()
        servicer.lane_address = f"127.0.0.1:{lane.port}"
    # Every test runs with the batch calls as unary calls, as messages of a gRPC session, and on the session lane.
    session = {"unary": None, "session": PoolSession(raw_stub), "lane": PoolSession(raw_stub, b"s")}[request.param]
    stub = CountingStub(session or raw_stub)
    sums = [block_checksum(data[i * BLOCK:(i + 1) * BLOCK]) for i in range(NUM)]

    class Env:
        pass

    e = Env()
    e.master, e.dram, e.stub, e.raw_stub, e.engine = master, dram, stub, raw_stub, engine
    e.data, e.back, e.src, e.dst, e.sums = data, back, src, dst, sums

    def client(linger_s: float = 60.0, **kwargs) -> PoolClient:
        return PoolClient(stub, engine, linger_s=linger_s, **kwargs)

    async def put(c: PoolClient, idx: range) -> list[bool]:
        return await c.put_many(KEYS[idx.start:idx.stop], src, [i * BLOCK for i in idx], [BLOCK] * len(idx),
                                sums[idx.start:idx.stop])

    async def get(c: PoolClient, idx: range, verify: bool = True) -> list[bool]:
        return await c.get_many(KEYS[idx.start:idx.stop], dst, [i * BLOCK for i in idx], [BLOCK] * len(idx),
                                verify=verify)

    e.client, e.put, e.get = client, put, get
    e.servicer, e.pool, e.session, e.server = servicer, pool, session, server
    yield e
    if session is not None:
        # The lane variant really used the lane (a fallback to the gRPC stream would make it a repeat of "session").
        assert stub.transports == ({"lane"} if lane else {"grpc"}) or not stub.transports
        await session.close()
    if lane is not None:
        await lane.close()
    await channel.close()
    await server.stop(None)
    await engine.close()
    await store_engine.close()


def visible(master: PoolMaster) -> set[bytes]:
    return {k for k in KEYS if master.exists(k)}


def leased(master: PoolMaster) -> set[bytes]:
    return {k for k, b in master._blocks.items() if b.leases}


async def settled(condition, timeout_s: float = 2.0) -> bool:
    """`condition()` once the master has applied what the last call carried: a session message's put ends (on a
    put start) and releases (on a get) are applied right after its reply has gone, so they may trail the reply
    by a moment (a unary call applies them before it answers)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    return condition()


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


# ---- held leases ---------------------------------------------------------------------------------------------


def sessions_only(env) -> None:
    """Skips the unary variant: a plain stub has no stream to hold leases or reserve slots on."""
    if env.session is None:
        pytest.skip("a plain stub has no stream: no leases are held, no slots reserved, no work kept per stream")


async def holding(env, num: int, **kwargs) -> PoolClient:
    """A client (over a session) that has put blocks 0..num-1 and read them once, and now holds their leases."""
    sessions_only(env)
    c = env.client(**kwargs)
    await env.put(c, range(num))
    await c.flush()
    assert await env.get(c, range(num)) == [True] * num and c.num_held == num
    return c


async def replace_pool(env) -> None:
    """The instance's pool gives way to a new one (with no instance yet); the open session ends with it."""
    epoch = env.session.epoch
    env.servicer.use(Pool(PoolMaster()))
    assert await settled(lambda: env.session.epoch != epoch)


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
