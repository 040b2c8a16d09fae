"""The cachestore as a real process: heartbeats on NATS, gRPC health, probes, clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import grpc
import httpx
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tsukimi.common import subjects
from tsukimi.common.messages import Heartbeat, decode
from tsukimi.common.natsserver import free_port

STARTUP_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 5.0


async def _wait_healthy(url: str, proc: subprocess.Popen) -> httpx.Response:
    """Polls the probe's /health until it answers 200; fails early if the process dies."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"cachestore exited early with {proc.returncode}:\n{proc.stderr.read().decode()}")
            try:
                response = await client.get(url)
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail(f"{url} not healthy within {STARTUP_TIMEOUT_S}s")


async def _next_beat(queue: asyncio.Queue[Heartbeat], timeout_s: float, *, is_leaving: bool) -> Heartbeat:
    """The next heartbeat whose `is_leaving` flag matches."""
    deadline = time.monotonic() + timeout_s
    while True:
        beat = await asyncio.wait_for(queue.get(), timeout=max(0.01, deadline - time.monotonic()))
        if beat.is_leaving == is_leaving:
            return beat


async def test_cachestore_lifecycle(nats_url: str) -> None:
    instance_id = f"cachestore-test-{uuid.uuid4().hex[:8]}"
    grpc_port, metrics_port = free_port(), free_port()
    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    nc = await nats.connect(nats_url)

    async def _on_beat(msg) -> None:
        await beats.put(decode(msg.data, Heartbeat))

    await nc.subscribe(subjects.heartbeat("cachestore", instance_id), cb=_on_beat)
    await nc.flush()

    env = {k: v for k, v in os.environ.items() if not k.startswith("TSUKIMI_")}
    env.update(
        TSUKIMI_NATS_URL=nats_url,
        TSUKIMI_INSTANCE_ID=instance_id,
        TSUKIMI_HOST="127.0.0.1",
        TSUKIMI_CACHESTORE_GRPC_PORT=str(grpc_port),
        TSUKIMI_METRICS_PORT=str(metrics_port),
        TSUKIMI_HEARTBEAT_INTERVAL_S="0.2",
        TSUKIMI_CLUSTER_SECRET=SECRET.decode(),
        TSUKIMI_CACHE_DRAM_BYTES=str(16 << 20),
        TSUKIMI_CACHE_POOL=instance_id,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsukimi", "cachestore"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        health = await _wait_healthy(f"http://127.0.0.1:{metrics_port}/health", proc)
        assert health.json()["service"] == "cachestore"
        assert health.json()["instance_id"] == instance_id

        beat = await _next_beat(beats, 5.0, is_leaving=False)
        assert beat.kind == "cachestore" and beat.instance_id == instance_id
        while not beat.is_pool_master:  # alone, it wins the election at once
            beat = await _next_beat(beats, 5.0, is_leaving=False)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert beat.grpc_address == f"127.0.0.1:{grpc_port}" and beat.kv_segment == instance_id

        await _put_and_get_a_block_through_the_pool(nc, beat)
        # The plain client, then the workers' own (held leases, reserved slots), on prompts of their own.
        await _corrupt_block_is_a_miss_and_its_replica_is_dropped(nc, beat, 0, 0, first_token=0)
        await _corrupt_block_is_a_miss_and_its_replica_is_dropped(nc, beat, 1024, 16 << 20, first_token=100)

        async with httpx.AsyncClient(timeout=2.0) as client:
            metrics = await client.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert metrics.status_code == 200
        assert "tsukimi_cachestore_up 1.0" in metrics.text
        assert "tsukimi_cachestore_hits_total" in metrics.text
        assert "tsukimi_cachestore_bad_replicas_total 2.0" in metrics.text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(metrics.text) for s in family.samples}
        assert samples[("tsukimi_cachestore_tier_capacity_bytes", (("instance", instance_id), ("tier", "dram")))] \
            == 16 << 20

        proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(proc.wait, EXIT_TIMEOUT_S)
        assert returncode == 0, proc.stderr.read().decode()
        leaving = await _next_beat(beats, 2.0, is_leaving=True)
        assert leaving.instance_id == instance_id
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await nc.close()


SECRET = b"cachestore-test-secret"


async def _put_and_get_a_block_through_the_pool(nc, beat: Heartbeat) -> None:
    """Two-phase put (metadata over gRPC, bytes through the transfer engine), then a leased get and read."""
    import uuid
    import zlib

    import numpy as np

    from tsukimi.proto import cachestore_pb2 as pb
    from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
    from tsukimi.transfer.engine import TransferEngine
    from tsukimi.transfer.metadata import NatsMetadataStore

    engine = await TransferEngine("client-" + uuid.uuid4().hex[:6], SECRET, NatsMetadataStore(nc)).start()
    data = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8)
    back = np.zeros_like(data)
    src, dst = engine.register(data, read_only=True), engine.register(back)
    key = bytes(range(32))
    try:
        async with grpc.aio.insecure_channel(beat.grpc_address) as channel:
            stub = pb_grpc.CacheStoreStub(channel)
            assert (await stub.Lookup(pb.LookupRequest(keys=[key]))).num_leading == 0
            assert not (await stub.Get(pb.KeyRequest(key=key))).found
            started = await stub.PutStart(pb.PutStartRequest(key=key, size=data.nbytes, num_replicas=1,
                                                             checksum=f"{zlib.crc32(data):08x}"))
            (replica,) = started.replicas
            assert not (await stub.Get(pb.KeyRequest(key=key))).found  # invisible until the put ends
            await engine.write(src, 0, replica.segment, replica.buffer_id, replica.offset, data.nbytes)
            await stub.PutEnd(pb.KeyRequest(key=key))
            assert (await stub.Lookup(pb.LookupRequest(keys=[key, b"x" * 32]))).num_leading == 1
            got = await stub.Get(pb.KeyRequest(key=key))
            assert got.found and got.checksum == f"{zlib.crc32(data):08x}"
            r = got.replicas[0]
            await engine.read(dst, 0, r.segment, r.buffer_id, r.offset, r.size)
            assert np.array_equal(back, data)
            assert not (await stub.Remove(pb.KeyRequest(key=key))).removed  # leased
            await stub.Release(pb.ReleaseRequest(key=key, lease_id=got.lease_id))
            assert (await stub.Remove(pb.KeyRequest(key=key))).removed
            stats = await stub.Stats(pb.Empty())
            assert (stats.hits, stats.misses, stats.num_blocks) == (1, 2, 0)
    finally:
        await engine.close()


async def _corrupt_block_is_a_miss_and_its_replica_is_dropped(nc, beat: Heartbeat, hold_leases: int,
                                                              reserve_bytes: int, first_token: int) -> None:
    """Prefill's pool client (on the master's session lane): blocks it stores load back; a block whose bytes no
    longer match its checksum ends the usable prefix there and is dropped from the pool (also when the client
    reads it under a lease it holds)."""
    import uuid

    import numpy as np
    import torch

    from tsukimi.kvpool.block_keys import block_keys
    from tsukimi.common.messages import KVLayout
    from tsukimi.kvpool.prefix_cache import PrefixCache
    from tsukimi.proto import cachestore_pb2 as pb
    from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
    from tsukimi.transfer.engine import TransferEngine
    from tsukimi.transfer.metadata import NatsMetadataStore

    engine = await TransferEngine("prefill-" + uuid.uuid4().hex[:6], SECRET, NatsMetadataStore(nc)).start()
    cache = PrefixCache(engine, "demo", block_tokens=4, secret=SECRET, hold_leases=hold_leases,
                        reserve_bytes=reserve_bytes)
    cache.use(beat.grpc_address)
    layout = KVLayout(num_layers=2, num_kv_heads=1, seq_len=4, head_dim=8, dtype="float32")
    prompt = list(range(first_token, first_token + 13))  # 3 full blocks + 1 token
    kv = [(torch.randn(1, 1, 13, 8), torch.randn(1, 1, 13, 8)) for _ in range(2)]
    try:
        assert await cache.store(prompt, kv, num_cached_blocks=0) == 3
        assert cache._client.num_slots == (256 if reserve_bytes else 0)  # written into slots; a full stock left
        assert cache._session.transport == "lane"  # prefill's calls go over the master's session lane
        loaded = await cache.load(prompt, layout)
        assert loaded[0][0].shape[2] == 12 and torch.equal(loaded[1][1], kv[1][1][:, :, :12])
        # Corrupt the second block in the pool's memory (a one-sided write, as a failing disk or bug would).
        keys = block_keys(prompt, 4, "demo")
        async with grpc.aio.insecure_channel(beat.grpc_address) as channel:
            stub = pb_grpc.CacheStoreStub(channel)
            got = await stub.Get(pb.KeyRequest(key=keys[1]))
            garbage = engine.register(np.full(layout.num_bytes, 7, dtype=np.uint8), read_only=True)
            r = got.replicas[0]
            await engine.write(garbage, 0, r.segment, r.buffer_id, r.offset, layout.num_bytes)
            await stub.Release(pb.ReleaseRequest(key=keys[1], lease_id=got.lease_id))
            loaded = await cache.load(prompt, layout)
            assert loaded[0][0].shape[2] == 4  # only the block before the bad one
            # With held leases, this load asked the master nothing: all three were read under the first load's.
            assert cache._client.num_held_reads == (3 if hold_leases else 0)
            assert (await stub.Lookup(pb.LookupRequest(keys=keys))).num_leading == 1
            assert not (await stub.Get(pb.KeyRequest(key=keys[1]))).found
    finally:
        await cache.close()
        await engine.close()
