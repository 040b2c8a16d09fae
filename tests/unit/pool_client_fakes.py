"""Shared by the `PoolClient` tests: a real CacheStore gRPC servicer in this process (no broker) behind the `env`
fixture (unary calls, a gRPC session, the session lane), a stub that counts its calls, and what the master shows."""

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
