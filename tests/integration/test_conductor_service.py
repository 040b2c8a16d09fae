"""Conductors over real NATS with fake workers: two conductors in one queue group place every request exactly
once; a request that would miss its TTFT objective is answered 429 before any prefill worker sees it."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid

import nats

from tsukimi.common import subjects
from tsukimi.common.cost_model import CostModel
from tsukimi.common.messages import (
    DecodeStatus, GenerateRequest, Heartbeat, PrefillStatus, PrefillTask, SamplingParams, SubmitReply, TaskAck, decode, encode,
)
from tsukimi.common.settings import Settings
from tsukimi.conductor.service import ConductorService

COST = CostModel(prefill_per_token_s=0.001, decode_base_s=0.01, decode_per_seq_s=0.001, source="measured")


class NoJournal:
    def record(self, *args):
        pass


async def _fake_workers(nc, model: str, queued_s: float, tasks: collections.Counter, stop: asyncio.Event):
    """Two prefill and one decode instance: heartbeats, and prefill instances accepting every task."""
    async def on_task(msg):
        tasks[decode(msg.data, PrefillTask).request.request_id] += 1
        await msg.respond(encode(TaskAck(is_accepted=True)))

    for i in range(2):
        await nc.subscribe(subjects.prefill_tasks(f"{model}-p{i}"), cb=on_task)
    while not stop.is_set():
        for i in range(2):
            await nc.publish(subjects.heartbeat("prefill", f"{model}-p{i}"), encode(Heartbeat(
                instance_id=f"{model}-p{i}", model=model, cost_model=COST,
                status=PrefillStatus(queued_prefill_s=queued_s), host="h")))
        await nc.publish(subjects.heartbeat("decode", f"{model}-d0"), encode(Heartbeat(
            instance_id=f"{model}-d0", model=model, kv_segment=f"{model}-d0", cost_model=COST, host="h",
            status=DecodeStatus(max_running=64, num_free_kv_bytes=1 << 30))))
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass


async def _run_conductors(nats_url: str, n: int, stop: asyncio.Event, **settings):
    services = [ConductorService(Settings(nats_url=nats_url, instance_id=f"conductor-{uuid.uuid4().hex[:6]}",
                                          heartbeat_interval_s=0.2, **settings), NoJournal()) for _ in range(n)]
    return services, [asyncio.create_task(s.run(stop)) for s in services]


def _request(model: str, i: int) -> GenerateRequest:
    return GenerateRequest(request_id=f"r{i}-{uuid.uuid4().hex[:6]}", model=model, prompt_token_ids=list(range(50)),
                           sampling=SamplingParams(max_tokens=8), arrival_time=time.time())


async def _wait_until_placeable(nc, model: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            msg = await nc.request(subjects.SUBMIT, encode(_request(model, -1)), timeout=5)
        except nats.errors.NoRespondersError:  # the conductors are not subscribed yet
            await asyncio.sleep(0.1)
            continue
        reply = decode(msg.data, SubmitReply)
        if reply.is_accepted or (reply.error and reply.error.http_status == 429):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("conductors never saw the workers")


async def test_two_conductors_place_each_request_exactly_once(nats_url):
    model = "m-" + uuid.uuid4().hex[:6]
    nc = await nats.connect(nats_url)
    stop = asyncio.Event()
    tasks: collections.Counter = collections.Counter()
    workers = asyncio.create_task(_fake_workers(nc, model, 0.0, tasks, stop))
    services, runs = await _run_conductors(nats_url, 2, stop, rejection="none")
    try:
        await _wait_until_placeable(nc, model)
        tasks.clear()
        replies = await asyncio.gather(*[nc.request(subjects.SUBMIT, encode(_request(model, i)), timeout=10)
                                         for i in range(40)])
        assert all(decode(r.data, SubmitReply).is_accepted for r in replies)
        assert len(tasks) == 40 and set(tasks.values()) == {1}  # every request dispatched once, by one conductor
        placed_on = {decode(r.data, SubmitReply).prefill_id for r in replies}
        assert placed_on == {f"{model}-p0", f"{model}-p1"}  # the burst is spread by the booked queues
    finally:
        stop.set()
        await asyncio.gather(*runs, workers)
        await nc.close()


async def test_predicted_ttft_over_the_objective_is_a_429_before_any_prefill(nats_url):
    model = "m-" + uuid.uuid4().hex[:6]
    nc = await nats.connect(nats_url)
    stop = asyncio.Event()
    tasks: collections.Counter = collections.Counter()
    workers = asyncio.create_task(_fake_workers(nc, model, 45.0, tasks, stop))  # 45 s of work queued each
    services, runs = await _run_conductors(nats_url, 1, stop, rejection="predicted", ttft_slo_s=30.0)
    try:
        await _wait_until_placeable(nc, model)
        reply = decode((await nc.request(subjects.SUBMIT, encode(_request(model, 0)), timeout=5)).data, SubmitReply)
        assert not reply.is_accepted
        assert (reply.error.http_status, reply.error.code) == (429, "overloaded")
        assert reply.error.retry_after_s >= 15
        assert not tasks  # no prefill worker was asked
    finally:
        stop.set()
        await asyncio.gather(*runs, workers)
        await nc.close()
