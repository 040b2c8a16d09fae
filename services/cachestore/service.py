"""Cachestore service process: one instance of the KV cache pool.

It contributes a DRAM segment (shared memory registered with its transfer engine, where workers read and write
block bytes), holds the pool's metadata master, and serves the metadata API over gRPC
(`libs/tsukimi/proto/cachestore.proto`) next to the standard gRPC health service. It announces its gRPC address
and segment in its heartbeat. Must not import torch or transformers.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from tsukimi.common import bus, subjects
from tsukimi.common.messages import Heartbeat
from tsukimi.common.probe import ProbeServer
from tsukimi.common.runner import run_until_signal
from tsukimi.common.settings import Settings
from tsukimi.cachestore.master import PoolMaster
from tsukimi.cachestore.servicer import CacheStoreServicer
from tsukimi.proto import cachestore_pb2_grpc
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import NatsMetadataStore

log = logging.getLogger(__name__)

KIND = "cachestore"
# Seconds in-flight gRPC calls get to finish on shutdown.
GRPC_GRACE_S = 2.0

UP = Gauge("tsukimi_cachestore_up", "1 while the cachestore serves (gRPC health SERVING), 0 otherwise")


def _heartbeat(instance_id: str, grpc_address: str, segment: str, is_leaving: bool) -> Heartbeat:
    """This instance's heartbeat: where its API and its data are."""
    return Heartbeat(instance_id=instance_id, kind=KIND, grpc_address=grpc_address, kv_segment=segment,
                     sent_at=time.time(), is_leaving=is_leaving)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Runs one cachestore instance until `stop` is set, then leaves the cluster cleanly."""
    instance_id = settings.instance_name(KIND)
    nc = await bus.connect(settings.nats_url, name=instance_id)
    transfer = TransferEngine(instance_id, settings.secret_bytes(), NatsMetadataStore(nc, settings.segment_ttl_s),
                              host=settings.kv_host, port=settings.kv_port,
                              num_connections=settings.transfer_connections)
    await transfer.start()
    dram = transfer.allocate(settings.cache_dram_bytes)
    await transfer.publish()
    master = PoolMaster()
    master.add_instance(instance_id, settings.cache_dram_bytes)
    servicer = CacheStoreServicer(master, {instance_id: (transfer.segment_name, dram.buffer_id)},
                                  settings.cache_dram_bytes)

    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    cachestore_pb2_grpc.add_CacheStoreServicer_to_server(servicer, server)
    grpc_port = server.add_insecure_port(f"{settings.host}:{settings.cachestore_grpc_port}")
    if grpc_port == 0:
        raise RuntimeError(f"cannot bind gRPC to {settings.host}:{settings.cachestore_grpc_port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    UP.set(1)

    def _health() -> tuple[bool, dict]:
        details = {"instance_id": instance_id, "nats_connected": nc.is_connected, "grpc_port": grpc_port}
        return nc.is_connected and not stop.is_set(), details

    probe = ProbeServer(service=KIND, health=_health, host=settings.host, port=settings.metrics_port).start()
    log.info(
        "cachestore %s up: gRPC on %s:%d, probes on %d", instance_id, settings.host, grpc_port, probe.port
    )

    try:
        # Ends with the is_leaving heartbeat once `stop` is set.
        await bus.heartbeat_forever(
            nc,
            subjects.heartbeat(KIND, instance_id),
            # NOTE: advertised on kv_host (reachable by peers), while gRPC binds `host` (maybe 0.0.0.0).
            lambda is_leaving: _heartbeat(instance_id, f"{settings.kv_host}:{grpc_port}", transfer.segment_name,
                                          is_leaving),
            settings.heartbeat_interval_s,
            stop,
        )
    finally:
        UP.set(0)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(GRPC_GRACE_S)
        probe.stop()
        await transfer.close()
        try:
            await nc.drain()
        except Exception:  # noqa: BLE001 (shutting down anyway)
            log.warning("could not drain the NATS connection", exc_info=True)
        log.info("cachestore %s stopped", instance_id)


def main(settings: Settings) -> None:
    """Entry point of `tsukimi cachestore`: serves until SIGINT/SIGTERM, then shuts down cleanly."""
    try:
        settings.secret_bytes()
    except ValueError as exc:
        raise SystemExit(f"tsukimi cachestore: {exc}") from None
    run_until_signal(lambda stop: serve(settings, stop))
