"""A conductor over real NATS with a fake prefill and a fake decode instance whose heartbeats say how much KV room
it has: a request that finds no room waits and is placed when a heartbeat shows room; one whose wait ends gets a
429 with Retry-After; one larger than the whole arena gets a 400 at once; a cancelled one leaves the queue."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats

from tsukimi.common import subjects
from tsukimi.common.cost_model import CostModel
from tsukimi.common.messages import (
    CancelRequest, DecodeStatus, GenerateRequest, Heartbeat, PrefillStatus, PrefillTask, SamplingParams, SubmitReply, TaskAck, decode, encode,
)
from tsukimi.common.settings import Settings
from tsukimi.conductor.service import ConductorService

# 100 bytes of KV per token; the decode arena: 32 blocks of 64 tokens (2,048 tokens).
COST = CostModel(prefill_per_token_s=0.0001, decode_base_s=0.01, decode_per_seq_s=0.001, kv_bytes_per_token=100,
                 source="measured")
BLOCK_BYTES = 64 * 100
NUM_BLOCKS = 32


class NoJournal:
    def record(self, *args):
        pass


class FakeWorkers:
    """One prefill instance taking every task, one decode instance reporting `free_blocks` and `progress`."""

    def __init__(self, nc, model: str):
        self.nc = nc
        self.model = model
        self.free_blocks = NUM_BLOCKS
        self.progress: dict[str, tuple[int, int]] = {}
        # Request id -> when its prefill task came.
        self.tasks: dict[str, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        async def on_task(msg):
            self.tasks[decode(msg.data, PrefillTask).request.request_id] = time.monotonic()
            await msg.respond(encode(TaskAck(is_accepted=True)))

        await self.nc.subscribe(subjects.prefill_tasks(f"{self.model}-p0"), cb=on_task)
        while not stop.is_set():
            await self.beat()
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    async def beat(self) -> None:
        m = self.model
        await self.nc.publish(subjects.heartbeat("prefill", f"{m}-p0"), encode(Heartbeat(
            instance_id=f"{m}-p0", status=PrefillStatus(), model=m, cost_model=COST, host="h")))
        await self.nc.publish(subjects.heartbeat("decode", f"{m}-d0"), encode(Heartbeat(
            instance_id=f"{m}-d0", model=m, kv_segment=f"{m}-d0", cost_model=COST, host="h",
            status=DecodeStatus(max_running=64, num_kv_bytes=NUM_BLOCKS * BLOCK_BYTES,
                                num_free_kv_bytes=self.free_blocks * BLOCK_BYTES, progress=dict(self.progress),
                                num_running=len(self.progress)))))


def _request(model: str, num_prompt: int, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(request_id=f"r-{uuid.uuid4().hex[:8]}", model=model,
                           prompt_token_ids=list(range(num_prompt)), sampling=SamplingParams(max_tokens=max_tokens),
                           arrival_time=time.time())


async def _submit(nc, request: GenerateRequest) -> SubmitReply:
    return decode((await nc.request(subjects.SUBMIT, encode(request), timeout=10)).data, SubmitReply)


async def _started(nats_url: str, stop: asyncio.Event, **settings):
    model = "m-" + uuid.uuid4().hex[:6]
    nc = await nats.connect(nats_url)
    workers = FakeWorkers(nc, model)
    service = ConductorService(Settings(nats_url=nats_url, instance_id=f"conductor-{uuid.uuid4().hex[:6]}",
                                        heartbeat_interval_s=0.2, cache_block_tokens=64, **settings), NoJournal())
    tasks = [asyncio.create_task(workers.run(stop)), asyncio.create_task(service.run(stop))]
    deadline = time.monotonic() + 10
    while service.view.serving(model) == ([], []) or not all(service.view.serving(model)):
        assert time.monotonic() < deadline, "the conductor never saw the workers"
        await asyncio.sleep(0.05)
    return nc, model, workers, service, tasks


async def test_a_request_waits_for_decode_room_and_is_placed_when_a_heartbeat_shows_it(nats_url):
    stop = asyncio.Event()
    nc, model, workers, service, tasks = await _started(nats_url, stop, decode_wait_s=5.0)
    try:
        big = _request(model, 1500, 548)  # 2,048 tokens: the whole arena
        assert (await _submit(nc, big)).is_accepted
        # Decode holds it and reports it: no room left.
        workers.free_blocks, workers.progress = 8, {big.request_id: (500, 2048)}
        small = _request(model, 50, 8)
        pending = asyncio.create_task(_submit(nc, small))
        while not len(service.waiting):
            await asyncio.sleep(0.01)
        assert small.request_id in service.waiting and small.request_id not in workers.tasks
        await asyncio.sleep(0.5)  # heartbeats come and go: still no room
        assert not pending.done() and small.request_id not in workers.tasks
        workers.free_blocks, workers.progress = NUM_BLOCKS, {}  # the big one is over
        reply = await pending
        assert reply.is_accepted and reply.prefill_id == f"{model}-p0" and reply.decode_id == f"{model}-d0"
        assert small.request_id in workers.tasks and len(service.waiting) == 0
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await nc.close()


async def test_a_request_whose_wait_ends_gets_a_429_and_one_larger_than_the_arena_a_400_at_once(nats_url):
    stop = asyncio.Event()
    nc, model, workers, service, tasks = await _started(nats_url, stop, decode_wait_s=1.0)
    try:
        big = _request(model, 1500, 548)
        assert (await _submit(nc, big)).is_accepted
        workers.free_blocks, workers.progress = 0, {big.request_id: (500, 2048)}
        waited = _request(model, 50, 8)
        reply = await _submit(nc, waited)
        assert not reply.is_accepted
        assert (reply.error.http_status, reply.error.code) == (429, "overloaded")
        assert "no decode instance had room for its KV within 1s" in reply.error.message
        assert reply.error.retry_after_s >= 1.0
        huge = _request(model, 2000, 49)  # 2,049 tokens: 33 blocks, more than the arena
        reply = await _submit(nc, huge)
        assert (reply.error.http_status, reply.error.code) == (400, "kv_capacity_exceeded")
        assert "2049 tokens" in reply.error.message and "(2048 tokens)" in reply.error.message
        assert waited.request_id not in workers.tasks and huge.request_id not in workers.tasks
        assert len(service.waiting) == 0
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await nc.close()


async def test_a_cancelled_request_leaves_the_queue_and_a_full_queue_answers_429(nats_url):
    stop = asyncio.Event()
    nc, model, workers, service, tasks = await _started(nats_url, stop, decode_wait_s=5.0, max_decode_wait_requests=1)
    try:
        big = _request(model, 1500, 548)
        assert (await _submit(nc, big)).is_accepted
        workers.free_blocks, workers.progress = 0, {big.request_id: (500, 2048)}
        first = _request(model, 50, 8)
        pending = asyncio.create_task(_submit(nc, first))
        while not len(service.waiting):
            await asyncio.sleep(0.01)
        reply = await _submit(nc, _request(model, 50, 8))
        assert (reply.error.http_status, reply.error.code) == (429, "overloaded")
        assert "1 requests already wait for room" in reply.error.message
        await nc.publish(subjects.CANCEL, encode(CancelRequest(request_id=first.request_id, reason="client_disconnected")))
        reply = await pending
        assert (reply.is_accepted, reply.error.code) == (False, "cancelled")
        assert len(service.waiting) == 0 and first.request_id not in workers.tasks
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await nc.close()
