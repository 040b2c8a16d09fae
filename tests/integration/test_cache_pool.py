"""Several cachestore processes forming one pool: an elected master, members contributing DRAM and SSD,
replicas across instances, demotion to SSD and promotion back, change-replica, loss of an instance, events with
resynchronisation, failover to another master, and a restarted instance serving its SSD blocks again (its
index in PostgreSQL)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import grpc
import nats
import numpy as np
import pytest
import sqlalchemy

from tsukimi.cachestore.service import ssd_owner
from tsukimi.cachestore.ssd_tier import ssd_blocks_table
from tsukimi.common import subjects
from tsukimi.kvpool.checksum import block_checksum
from tsukimi.common.messages import Heartbeat, PoolEvents, PoolSnapshot, PoolSnapshotRequest, decode, encode
from tsukimi.common.natsserver import free_port
from tsukimi.kvpool.pool_view import PoolView
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import NatsMetadataStore

SECRET = "cache-pool-test-secret"
BLOCK = 64 << 10
DRAM = 1 << 20  # 16 blocks per instance
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TTL_S = 1.5


def _postgres_or_skip() -> str:
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    return POSTGRES_URL


class Cluster:
    """Cachestore processes of one pool on the test's NATS server."""

    def __init__(self, nats_url: str, tmp_path):
        self.nats_url = nats_url
        self.tmp_path = tmp_path
        self.pool = "pool-" + uuid.uuid4().hex[:8]
        self.procs: dict[str, subprocess.Popen] = {}
        self.beats: dict[str, Heartbeat] = {}

    def start(self, name: str, *, ssd: bool = False, database_url: str = "", may_lead: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TSUKIMI_")}
        env.update(TSUKIMI_NATS_URL=self.nats_url, TSUKIMI_INSTANCE_ID=name, TSUKIMI_CLUSTER_SECRET=SECRET,
                   TSUKIMI_CACHESTORE_GRPC_PORT=str(free_port()), TSUKIMI_HEARTBEAT_INTERVAL_S="0.2",
                   TSUKIMI_INSTANCE_TTL_S=str(TTL_S), TSUKIMI_CACHE_DRAM_BYTES=str(DRAM),
                   TSUKIMI_CACHE_POOL=self.pool, TSUKIMI_CACHE_MASTER="auto" if may_lead else "never")
        if ssd:
            env.update(TSUKIMI_CACHE_SSD_DIR=str(self.tmp_path / f"ssd-{name}"),
                       TSUKIMI_CACHE_SSD_BYTES=str(64 * BLOCK), TSUKIMI_CACHE_DATABASE_URL=database_url)
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "tsukimi", "cachestore"], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self, name: str, sig=signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        assert proc.wait(10) in (0, -signal.SIGKILL)
        self.beats.pop(name, None)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()

    async def on_beat(self, msg) -> None:
        beat = decode(msg.data, Heartbeat)
        if beat.instance_id in self.procs and not beat.is_leaving:
            self.beats[beat.instance_id] = beat

    async def master(self, stub_for, expect_instances: set[str], timeout_s: float = 20.0):
        """(name, stub) of the master once its Stats list exactly `expect_instances`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                assert proc.poll() is None, proc.stderr.read().decode()
            leaders = [b for b in self.beats.values() if b.is_pool_master]
            if leaders:
                stub = stub_for(leaders[0].grpc_address)
                try:
                    stats = await stub.Stats(pb.Empty(), timeout=2)
                    if {t.instance_id for t in stats.tiers} == expect_instances:
                        return leaders[0].instance_id, stub
                except grpc.aio.AioRpcError:
                    pass
            await asyncio.sleep(0.1)
        pytest.fail(f"no master listing {expect_instances}; beats: {self.beats}")


async def test_instances_form_one_pool_with_ssd_replicas_failover_and_restart(nats_url, tmp_path):
    postgres = _postgres_or_skip()
    cluster = Cluster(nats_url, tmp_path)
    nc = await nats.connect(nats_url)
    engine = await TransferEngine("pool-client-" + uuid.uuid4().hex[:6], SECRET.encode(),
                                  NatsMetadataStore(nc)).start()
    channels: dict[str, grpc.aio.Channel] = {}

    def stub_for(address: str) -> pb_grpc.CacheStoreStub:
        if address not in channels:
            channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.CacheStoreStub(channels[address])

    view = PoolView()
    received: list[PoolEvents] = []

    async def on_events(msg) -> None:
        received.append(decode(msg.data, PoolEvents))

    await nc.subscribe(subjects.heartbeat("cachestore", "*"), cb=cluster.on_beat)
    await nc.subscribe(subjects.POOL_EVENTS, cb=on_events)
    rng = np.random.default_rng(7)
    blocks = {bytes([i]) * 32: rng.integers(0, 256, BLOCK, dtype=np.uint8) for i in range(60)}
    keys = list(blocks)
    scratch = np.zeros(BLOCK, dtype=np.uint8)
    scratch_buf = engine.register(scratch)

    async def put(stub, key, num_replicas=1):
        data = blocks[key]
        started = await stub.PutStart(pb.PutStartRequest(key=key, size=BLOCK, checksum=block_checksum(data),
                                                         num_replicas=num_replicas))
        src = engine.register(data, read_only=True)
        try:
            for r in started.replicas:
                await engine.write(src, 0, r.segment, r.buffer_id, r.offset, BLOCK)
        finally:
            engine.unregister(src)
        await stub.PutEnd(pb.KeyRequest(key=key))
        return started.replicas

    async def read(replica) -> bytes:
        await engine.read(scratch_buf, 0, replica.segment, replica.buffer_id, replica.offset, BLOCK)
        return scratch.tobytes()

    async def get_verified(stub, key) -> list:
        got = await stub.Get(pb.KeyRequest(key=key))
        assert got.found, f"block {key[:1].hex()} missing"
        assert all(r.tier == "dram" for r in got.replicas)
        for r in got.replicas:
            assert await read(r) == blocks[key].tobytes()
        await stub.Release(pb.ReleaseRequest(key=key, lease_id=got.lease_id))
        return list(got.replicas)

    try:
        cluster.start("cs-a", ssd=True)  # SQLite index in its SSD directory
        name, stub = await cluster.master(stub_for, {"cs-a"})
        assert name == "cs-a"
        cluster.start("cs-b", ssd=True, database_url=postgres)
        cluster.start("cs-c", may_lead=False)  # DRAM only, never master
        name, stub = await cluster.master(stub_for, {"cs-a", "cs-b", "cs-c"})
        assert name == "cs-a"

        # Events: load a snapshot, then follow the stream.
        snap = decode((await nc.request(subjects.POOL_SNAPSHOT, encode(PoolSnapshotRequest()), timeout=5)).data,
                      PoolSnapshot)
        view.load(snap)

        # Replicas on distinct instances; both copies readable and exact.
        replicas = await put(stub, keys[0], num_replicas=2)
        assert len({r.instance_id for r in replicas}) == 2
        assert len(await get_verified(stub, keys[0])) == 2
        # Raise to three (one on every instance), then lower to one.
        changed = await stub.ChangeReplicas(pb.ChangeReplicasRequest(key=keys[0], num_replicas=3))
        assert sorted(r.instance_id for r in changed.replicas) == ["cs-a", "cs-b", "cs-c"]
        assert len(await get_verified(stub, keys[0])) == 3
        lowered = await stub.ChangeReplicas(pb.ChangeReplicasRequest(key=keys[0], num_replicas=1))
        assert len(lowered.replicas) == 1

        # 60 blocks for 48 blocks of DRAM: past the 90% watermarks the oldest go to SSD on a and b (c drops them).
        for key in keys[1:]:
            await put(stub, key)
        stats = await stub.Stats(pb.Empty())
        ssd_blocks = {t.instance_id: t.num_blocks for t in stats.tiers if t.tier == "ssd"}
        assert sum(ssd_blocks.values()) > 0, stats
        # Every block still present is served from DRAM (SSD ones promoted first), bytes exact.
        present = [k for k, e in zip(keys, (await stub.BatchExists(pb.KeysRequest(keys=keys))).exists) if e]
        assert present
        for key in present:
            await get_verified(stub, key)

        # The event stream mirrors the master's index exactly.
        await asyncio.sleep(0.3)
        for message in sorted(received, key=lambda m: m.seq):
            view.apply(message)
        assert not view.needs_resync
        snap = decode((await nc.request(subjects.POOL_SNAPSHOT, encode(PoolSnapshotRequest()), timeout=5)).data,
                      PoolSnapshot)
        assert view.seq == snap.seq
        assert {(k, h) for k in view._holders for h in view.holders(k)} == \
            {(r.key, (r.instance_id, r.tier)) for r in snap.replicas}

        # c dies without a word: within the TTL the master drops it and lookups stop pointing at it.
        cluster.stop("cs-c", signal.SIGKILL)
        name, stub = await cluster.master(stub_for, {"cs-a", "cs-b"})
        lookup = await stub.Lookup(pb.LookupRequest(keys=keys))
        assert "cs-c" not in {c.instance_id for c in lookup.counts}

        # b's SSD blocks, to find again after its restart.
        stats = await stub.Stats(pb.Empty())
        num_b_ssd = next(t.num_blocks for t in stats.tiers if t.instance_id == "cs-b" and t.tier == "ssd")

        # The master leaves: b takes over (fresh metadata: its own SSD blocks only).
        cluster.stop("cs-a")
        name, stub = await cluster.master(stub_for, {"cs-b"})
        assert name == "cs-b"
        stats = await stub.Stats(pb.Empty())
        assert next(t.num_blocks for t in stats.tiers if t.tier == "ssd") == num_b_ssd

        # a comes back on the same SSD directory and index: it joins b's pool and every SSD block it held is
        # served again, bytes intact.
        cluster.start("cs-a", ssd=True)
        name, stub = await cluster.master(stub_for, {"cs-a", "cs-b"})
        assert name == "cs-b"
        stats = await stub.Stats(pb.Empty())
        num_a_ssd = next(t.num_blocks for t in stats.tiers if t.instance_id == "cs-a" and t.tier == "ssd")
        assert num_a_ssd > 0
        exists = (await stub.BatchExists(pb.KeysRequest(keys=keys))).exists
        assert sum(exists) >= num_a_ssd + num_b_ssd - 1  # a block may sit on both
        for key, is_there in zip(keys, exists):
            if is_there:
                await get_verified(stub, key)
    finally:
        cluster.close()
        for channel in channels.values():
            await channel.close()
        await engine.close()
        await nc.close()
        engine_pg = sqlalchemy.create_engine(postgres)
        with engine_pg.begin() as conn:
            owner = ssd_owner(str(tmp_path / "ssd-cs-b"))
            conn.execute(ssd_blocks_table.delete().where(ssd_blocks_table.c.owner == owner))
        engine_pg.dispose()
