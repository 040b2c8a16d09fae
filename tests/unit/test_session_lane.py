"""The cachestore's session lane against a real servicer and pool in this process (no broker): what a client
that holds the secret gets, what one that does not gets, malformed messages, a lane that cannot be reached or is
not offered, an instance that is not the master, and a lane that goes away under waiting operations."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from tsukimi.cachestore.master import PoolMaster
from tsukimi.cachestore.member import LocalMember
from tsukimi.cachestore.pool import Instance, Pool
from tsukimi.cachestore.servicer import CacheStoreServicer
from tsukimi.cachestore.session_lane import SessionLane
from tsukimi.kvpool import session_lane as lane_wire
from tsukimi.common.natsserver import free_port
from tsukimi.kvpool.pool_session import PoolSession
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer import wire
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import MemoryMetadataStore

SECRET = b"lane-secret"
KEY = b"k" * 32


@pytest.fixture
async def env():
    servicer = CacheStoreServicer(Pool(PoolMaster()))
    server = grpc.aio.server()
    pb_grpc.add_CacheStoreServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    lane = await SessionLane(servicer, SECRET, "127.0.0.1", 0).start()
    servicer.lane_address = f"127.0.0.1:{lane.port}"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.CacheStoreStub(channel)
    yield servicer, lane, stub
    await lane.close()
    await channel.close()
    await server.stop(None)


async def test_a_client_with_the_secret_is_answered_on_the_lane(env):
    servicer, lane, stub = env
    session = PoolSession(stub, SECRET)
    reply = await session.BatchGet(pb.KeysRequest(keys=[KEY, KEY]), timeout=5)
    assert [g.found for g in reply.gets] == [False, False]
    assert session.transport == "lane"
    await session.BatchPutEnd(pb.KeysRequest(), timeout=5)
    await session.close()
    assert session.transport == "" and lane.num_auth_failures == 0


async def test_a_wrong_secret_is_refused_and_nothing_is_served(env):
    servicer, lane, stub = env
    session = PoolSession(stub, b"not-the-secret")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await session.BatchGet(pb.KeysRequest(keys=[KEY]), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert lane.num_auth_failures == 1
    await session.close()
    # A raw peer that skips the handshake gets nothing either: its bytes are taken as a failed proof.
    reader, writer = await asyncio.open_connection("127.0.0.1", lane.port)
    await reader.readexactly(len(lane_wire.MAGIC) + 1 + wire.NONCE_BYTES)
    writer.write(lane_wire.frame(pb.SessionRequest(id=1, get=pb.KeysRequest(keys=[KEY]))).ljust(64, b"\0"))
    assert (await reader.readexactly(33))[0] == wire.STATUS_REFUSED
    assert await reader.read() == b""
    writer.close()
    assert lane.num_auth_failures == 2


async def test_a_malformed_message_ends_that_connection_only(env):
    servicer, lane, stub = env
    reader, writer = await asyncio.open_connection("127.0.0.1", lane.port)
    await wire.client_handshake_async(reader, writer, SECRET, lane_wire.MAGIC)
    writer.write(lane_wire.FRAME.pack(3) + b"\xff\xff\xff")
    reply = pb.SessionReply.FromString(await lane_wire.read_frame(reader))
    assert reply.WhichOneof("result") == "error"
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert await reader.read() == b""
    writer.close()
    # A frame longer than the lane takes is refused before its bytes are read.
    reader, writer = await asyncio.open_connection("127.0.0.1", lane.port)
    await wire.client_handshake_async(reader, writer, SECRET, lane_wire.MAGIC)
    writer.write(lane_wire.FRAME.pack(lane_wire.MAX_FRAME_BYTES + 1))
    reply = pb.SessionReply.FromString(await lane_wire.read_frame(reader))
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    writer.close()
    # Others are still served.
    session = PoolSession(stub, SECRET)
    assert len((await session.BatchGet(pb.KeysRequest(keys=[KEY]), timeout=5)).gets) == 1
    await session.close()


async def test_no_lane_or_an_unreachable_one_falls_back_to_the_grpc_stream(env, caplog):
    servicer, lane, stub = env
    servicer.lane_address = ""
    session = PoolSession(stub, SECRET)
    await session.BatchPutEnd(pb.KeysRequest(), timeout=5)
    assert session.transport == "grpc"
    await session.close()
    servicer.lane_address = f"127.0.0.1:{free_port()}"  # nothing listens there
    session = PoolSession(stub, SECRET)
    with caplog.at_level(logging.WARNING, logger="tsukimi.kvpool.pool_session"):
        await session.BatchPutEnd(pb.KeysRequest(), timeout=5)
    assert session.transport == "grpc"
    assert "cannot be used" in caplog.text
    await session.close()


async def test_an_instance_that_is_not_the_master_refuses_with_its_hint(env):
    servicer, lane, stub = env
    session = PoolSession(stub, SECRET)
    await session.BatchPutEnd(pb.KeysRequest(), timeout=5)
    servicer.use(None, master_hint="cachestore-b")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await session.BatchGet(pb.KeysRequest(keys=[KEY]), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cachestore-b" in refused.value.details()
    await session.close()


async def test_a_lane_that_goes_away_fails_waiting_operations_and_the_next_one_reconnects(env):
    servicer, lane, stub = env
    session = PoolSession(stub, SECRET)
    await session.BatchPutEnd(pb.KeysRequest(), timeout=5)
    # An operation the master is slow to answer (its pool lock is held) is under way when the lane closes.
    await servicer.pool._lock.acquire()
    waiting = asyncio.ensure_future(session.BatchGet(pb.KeysRequest(keys=[KEY]), timeout=5))
    await asyncio.sleep(0.05)
    port = lane.port
    await lane.close()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(waiting, 2)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    servicer.pool._lock.release()
    # A new lane (a restarted instance) is found again by the next operation.
    lane2 = await SessionLane(servicer, SECRET, "127.0.0.1", port).start()
    try:
        assert len((await session.BatchGet(pb.KeysRequest(keys=[KEY]), timeout=5)).gets) == 1
        assert session.transport == "lane"
    finally:
        await session.close()
        await lane2.close()


async def test_a_refused_put_start_still_ends_the_puts_it_carries(env):
    servicer, lane, stub = env
    engine = await TransferEngine("lane-pool", SECRET, MemoryMetadataStore(), transports=("shm",)).start()
    dram = engine.allocate(1 << 20)
    await servicer.pool.join("a", Instance(LocalMember(engine, dram, None), "lane-pool", dram.buffer_id),
                             dram.length, 0)
    session = PoolSession(stub, SECRET)
    started = await session.BatchPutStart(pb.BatchPutStartRequest(puts=[pb.PutStartRequest(
        key=KEY, size=4096, checksum="xxh3:0", num_replicas=1)]), timeout=5)
    assert started.puts[0].replicas
    # The next put start is refused (no size), but carries the first one's end: that block becomes visible.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await session.BatchPutStart(pb.BatchPutStartRequest(puts=[pb.PutStartRequest(key=b"x" * 32)],
                                                            done=pb.Done(put_end_keys=[KEY])), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert servicer.pool.master.exists(KEY)
    await session.close()
    await engine.close()
