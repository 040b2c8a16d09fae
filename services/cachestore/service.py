"""Cachestore service process: one instance of the KV cache pool.

Every instance contributes a DRAM segment (shared memory registered with its transfer engine, where workers read
and write block bytes) and optionally an SSD tier (files plus an SQLAlchemy index), and serves the `PoolMember`
gRPC API through which the master moves bytes between its tiers. One instance, elected through a key in a NATS
KV bucket (created only if absent, refreshed within its TTL), is the pool's master: it holds the metadata,
answers the `CacheStore` API, learns the other instances from their heartbeats (and drops those that go silent),
and publishes `PoolEvents`. When the master dies its key expires and another instance takes over with fresh
metadata: DRAM contents are a cache and are forgotten, SSD blocks are re-registered from each instance's index.
Must not import torch or transformers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError

from tsukimi.cachestore import metrics
from tsukimi.cachestore.master import PoolMaster
from tsukimi.cachestore.member import LocalMember, MemberError, MemberServicer, RemoteMember
from tsukimi.cachestore.pool import Instance, Pool
from tsukimi.cachestore.servicer import CacheStoreServicer
from tsukimi.cachestore.session_lane import SessionLane
from tsukimi.cachestore.ssd_tier import SsdTier
from tsukimi.common import subjects
from tsukimi.common.messages import CachestoreStatus, Heartbeat, PoolEvents, decode, encode
from tsukimi.common.probe import ProbeServer
from tsukimi.common.registry import InstanceRegistry
from tsukimi.common.service_runtime import ServiceRuntime, require_secret, run_until_signal
from tsukimi.common.settings import Settings
from tsukimi.proto import cachestore_pb2_grpc
from tsukimi.transfer.engine import LocalBuffer, TransferEngine
from tsukimi.transfer.metadata import NatsMetadataStore

log = logging.getLogger(__name__)

KIND = "cachestore"
# Seconds in-flight gRPC calls get to finish on shutdown.
GRPC_GRACE_S = 2.0
# JetStream KV bucket holding each pool's master key.
POOL_BUCKET = "tsukimi_pools"


def ssd_owner(directory: str) -> str:
    """The name an SSD tier's rows carry in a shared index: this host and the tier's directory."""
    return f"{socket.gethostname()}:{os.path.abspath(directory)}"


def open_ssd(settings: Settings) -> SsdTier | None:
    """The SSD tier configured for this instance (its blocks recovered), or None."""
    if not settings.cache_ssd_dir:
        return None
    directory = os.path.abspath(settings.cache_ssd_dir)
    url = settings.cache_database_url or f"sqlite:///{os.path.join(directory, 'index.sqlite')}"
    # NOTE: owned by host and directory, not the instance id (which changes with the pid): a restart finds its
    # blocks, and instances on other hosts sharing one PostgreSQL index never touch each other's rows.
    ssd = SsdTier(directory, url, owner=ssd_owner(directory), capacity_bytes=settings.cache_ssd_bytes)
    blocks = ssd.recover()
    log.info("SSD tier in %s: %d blocks (%d bytes) recovered", directory, len(blocks), ssd.used_bytes)
    return ssd


class Mastership:
    """This instance's side of the election, and the master's duties while it holds the key."""

    def __init__(self, settings: Settings, nc: Client, instance_id: str, boot_id: str, local: LocalMember,
                 servicer: CacheStoreServicer):
        self.settings = settings
        self.nc = nc
        self.instance_id = instance_id
        self.boot_id = boot_id
        self.local = local
        self.servicer = servicer
        self.pool: Pool | None = None
        self._key = f"master-{settings.cache_pool}"
        self._kv = None
        self._revision = 0
        self._registry = InstanceRegistry(settings.instance_ttl_s)
        self._subscriptions = []
        self._events: asyncio.Queue[PoolEvents] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()

    @property
    def is_master(self) -> bool:
        return self.pool is not None

    async def _bucket(self):
        if self._kv is None:
            js = self.nc.jetstream()
            try:
                self._kv = await js.key_value(POOL_BUCKET)
            except BucketNotFoundError:
                self._kv = await js.create_key_value(bucket=POOL_BUCKET, ttl=self.settings.instance_ttl_s,
                                                     history=1)
        return self._kv

    async def run(self, stop: asyncio.Event) -> None:
        """Campaigns for (or keeps) the master key every heartbeat interval until `stop`; then steps down."""
        interval = min(self.settings.heartbeat_interval_s, self.settings.instance_ttl_s / 3)
        publisher = asyncio.create_task(self._publish_events())
        try:
            while not stop.is_set():
                try:
                    await self._tick()
                except Exception as exc:  # NOTE: NATS hiccups must not kill the instance; the next tick retries.
                    log.warning("pool election: %s", exc)
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            if self.is_master:
                await self._resign()
                try:
                    await (await self._bucket()).delete(self._key)  # NOTE: lets another instance take over now.
                except Exception as exc:  # noqa: BLE001 (shutting down anyway)
                    log.warning("could not release the master key: %s", exc)
            publisher.cancel()

    async def _tick(self) -> None:
        kv = await self._bucket()
        value = self.instance_id.encode()
        if self.is_master:
            try:
                self._revision = await kv.update(self._key, value, last=self._revision)
            except KeyWrongLastSequenceError:
                log.warning("lost the master key of pool %s; stepping down", self.settings.cache_pool)
                await self._resign()
                return
            for iid in self._registry.expire(time.monotonic()):
                self._spawn(self._leave(iid, "went silent"))
            self.servicer.export()
        elif self.settings.cache_master == "auto":
            try:
                self._revision = await kv.create(self._key, value)
            except KeyWrongLastSequenceError:
                await self._note_master(kv)
                return
            await self._become()

    async def _note_master(self, kv) -> None:
        try:
            entry = await kv.get(self._key)
            self.servicer.master_hint = entry.value.decode() if entry and entry.value else ""
        except NotFoundError:
            self.servicer.master_hint = ""

    async def _become(self) -> None:
        master = PoolMaster(put_timeout_s=self.settings.cache_put_timeout_s)
        pool = Pool(master, publish=self._events.put_nowait, coalesce_s=self.settings.cache_events_coalesce_s)
        dram = self.local.dram
        ssd_bytes = self.local.ssd.capacity_bytes if self.local.ssd else 0
        num = await pool.join(self.instance_id, Instance(self.local, self.local.transfer.segment_name,
                                                         dram.buffer_id, self.boot_id), dram.length, ssd_bytes)
        self.pool = pool
        self.servicer.use(pool)
        self._registry = InstanceRegistry(self.settings.instance_ttl_s)
        self._subscriptions = [
            await self.nc.subscribe(subjects.heartbeat(KIND, "*"), cb=self._on_beat),
            await self.nc.subscribe(subjects.POOL_SNAPSHOT, cb=self._on_snapshot),
        ]
        metrics.IS_MASTER.set(1)
        log.info("master of pool %s (epoch %s); %d SSD blocks of its own", self.settings.cache_pool,
                 pool.epoch[:8], num)

    async def _resign(self) -> None:
        for sub in self._subscriptions:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 (connection may be gone)
                pass
        self._subscriptions = []
        pool, self.pool = self.pool, None
        self.servicer.use(None)
        metrics.IS_MASTER.set(0)
        if pool is not None:
            await pool.close()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_beat(self, msg) -> None:
        try:
            beat = decode(msg.data, Heartbeat)
        except Exception:  # noqa: BLE001 (a foreign payload on our subject)
            return
        if beat.instance_id == self.instance_id or self.pool is None:
            return
        if beat.is_leaving:
            self._registry.remove(beat.instance_id)
            self._spawn(self._leave(beat.instance_id, "left"))
            return
        known = self._registry.get(beat.instance_id)
        self._registry.observe(beat, time.monotonic())
        if known is None or known.boot_id != beat.boot_id:
            self._spawn(self._join(beat))

    async def _join(self, beat: Heartbeat) -> None:
        pool = self.pool
        member = RemoteMember(beat.grpc_address)
        try:
            status = beat.status
            instance = Instance(member, beat.kv_segment, status.kv_buffer_id, beat.boot_id)
            num = await pool.join(beat.instance_id, instance, status.num_dram_bytes, status.num_ssd_bytes)
        except MemberError as exc:
            log.warning("instance %s could not join: %s", beat.instance_id, exc)
            self._registry.remove(beat.instance_id)  # NOTE: its next heartbeat tries again.
            await member.close()
            return
        log.info("instance %s joined the pool: %d MiB DRAM, %d MiB SSD, %d SSD blocks", beat.instance_id,
                 status.num_dram_bytes >> 20, status.num_ssd_bytes >> 20, num)

    async def _leave(self, instance_id: str, why: str) -> None:
        if self.pool is not None:
            num_lost = await self.pool.leave(instance_id)
            log.info("instance %s %s: dropped from the pool (%d blocks lost)", instance_id, why, num_lost)

    async def _on_snapshot(self, msg) -> None:
        if self.pool is not None and msg.reply:
            await msg.respond(encode(await self.pool.snapshot()))

    async def _publish_events(self) -> None:
        while True:
            events = await self._events.get()
            try:
                await self.nc.publish(subjects.POOL_EVENTS, encode(events))
            except Exception as exc:  # noqa: BLE001 (consumers resynchronise on the gap)
                log.warning("could not publish pool events %d: %s", events.seq, exc)


def _heartbeat(mastership: Mastership, grpc_address: str, dram: LocalBuffer, is_leaving: bool) -> Heartbeat:
    """This instance's heartbeat: where its API and its data are, whether it is the master."""
    local = mastership.local
    status = CachestoreStatus(is_pool_master=mastership.is_master and not is_leaving,
                              kv_buffer_id=dram.buffer_id, num_dram_bytes=dram.length,
                              num_ssd_bytes=local.ssd.capacity_bytes if local.ssd else 0)
    return Heartbeat(instance_id=mastership.instance_id, status=status, grpc_address=grpc_address,
                     kv_segment=local.transfer.segment_name, boot_id=mastership.boot_id, sent_at=time.time(),
                     is_leaving=is_leaving)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Runs one cachestore instance until `stop` is set, then leaves the cluster cleanly."""
    instance_id = settings.instance_name(KIND)
    runtime = ServiceRuntime(instance_id)
    nc = await runtime.connect(settings.nats_url)
    transfer = TransferEngine(instance_id, settings.secret_bytes(), NatsMetadataStore(nc, settings.segment_ttl_s),
                              host=settings.kv_host, port=settings.kv_port,
                              num_connections=settings.transfer_connections)
    await transfer.start()
    dram = transfer.allocate(settings.cache_dram_bytes)
    await transfer.publish()
    ssd = await asyncio.to_thread(open_ssd, settings)
    local = LocalMember(transfer, dram, ssd)
    servicer = CacheStoreServicer()

    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    cachestore_pb2_grpc.add_CacheStoreServicer_to_server(servicer, server)
    cachestore_pb2_grpc.add_PoolMemberServicer_to_server(MemberServicer(local), server)
    grpc_port = server.add_insecure_port(f"{settings.host}:{settings.cachestore_grpc_port}")
    if grpc_port == 0:
        raise RuntimeError(f"cannot bind gRPC to {settings.host}:{settings.cachestore_grpc_port}")
    await server.start()
    lane = None
    if settings.cachestore_lane_port >= 0:
        lane = SessionLane(servicer, settings.secret_bytes(), settings.host, settings.cachestore_lane_port)
        await lane.start()
        servicer.lane_address = f"{settings.kv_host}:{lane.port}"
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    metrics.UP.set(1)
    mastership = Mastership(settings, nc, instance_id, uuid.uuid4().hex, local, servicer)
    runtime.loop(mastership.run(stop))

    def _health() -> tuple[bool, dict]:
        details = {"instance_id": instance_id, "nats_connected": nc.is_connected, "grpc_port": grpc_port,
                   "is_pool_master": mastership.is_master}
        return nc.is_connected and not stop.is_set(), details

    probe = ProbeServer(service=KIND, health=_health, host=settings.host, port=settings.metrics_port).start()
    log.info("cachestore %s up: gRPC on %s:%d, session lane %s, probes on %d, SSD tier %s", instance_id,
             settings.host, grpc_port, lane.port if lane else "off", probe.port, ssd.directory if ssd else "off")

    # NOTE: advertised on kv_host (reachable by peers), while gRPC binds `host` (maybe 0.0.0.0).
    runtime.beat(KIND, lambda is_leaving: _heartbeat(mastership, f"{settings.kv_host}:{grpc_port}", dram, is_leaving),
                 settings.heartbeat_interval_s, stop)

    async def stop_serving() -> None:
        metrics.UP.set(0)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(GRPC_GRACE_S)

    runtime.on_close(stop_serving)
    if lane is not None:
        runtime.on_close(lane.close)
    runtime.on_close(probe.stop)
    runtime.on_close(transfer.close)
    if ssd is not None:
        runtime.on_close(ssd.close)
    try:
        await stop.wait()
    finally:
        await runtime.shutdown()
        log.info("cachestore %s stopped", instance_id)


def main(settings: Settings) -> None:
    """Entry point of `tsukimi cachestore`: serves until SIGINT/SIGTERM, then shuts down cleanly."""
    require_secret(settings, "cachestore")
    run_until_signal(lambda stop: serve(settings, stop))
