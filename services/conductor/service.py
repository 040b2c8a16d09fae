"""Conductor process: tracks live instances from heartbeats, places each request, hands it to a prefill worker.

Several conductors may run: they share the submit subject in a NATS queue group, so each request is placed once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from tsukimi.common import subjects
from tsukimi.common.bus import connect, heartbeat_forever
from tsukimi.common.logs import request_id_var
from tsukimi.common.messages import (
    ErrorInfo, GenerateRequest, Heartbeat, PrefillTask, SubmitReply, TaskAck, decode, encode,
)
from tsukimi.common.registry import InstanceRegistry
from tsukimi.common.runner import run_with_probe
from tsukimi.common.settings import Settings
from tsukimi.conductor.journal import RequestJournal
from tsukimi.conductor.scheduler import LeastLoadedScheduler

log = logging.getLogger("tsukimi.conductor")

DECISIONS = Counter("tsukimi_conductor_decisions_total", "Placement decisions by outcome", ["outcome"])
INSTANCES = Gauge("tsukimi_conductor_instances", "Live instances by kind", ["kind"])
DECISION_SECONDS = Histogram("tsukimi_conductor_decision_seconds", "Time to place and dispatch a request",
                             buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))

MAX_PREFILL_ATTEMPTS = 3


class ConductorService:
    """The bus-facing side of the conductor."""

    def __init__(self, settings: Settings, journal: RequestJournal):
        self.settings = settings
        self.instance_id = settings.instance_name("conductor")
        self.registry = InstanceRegistry(settings.instance_ttl_s)
        self.scheduler = LeastLoadedScheduler()
        self.journal = journal
        # NOTE: one writer thread keeps journal writes ordered and off the event loop.
        self._journal_writer = ThreadPoolExecutor(1, thread_name_prefix="journal")
        self.nc = None

    async def _on_heartbeat(self, msg) -> None:
        try:
            beat = decode(msg.data, Heartbeat)
        except msgspec.ValidationError:
            return
        if beat.kind not in ("prefill", "decode"):
            return
        if beat.is_leaving:
            self.registry.remove(beat.instance_id)
            self.scheduler.forget(beat.instance_id)
            log.info("%s %s left", beat.kind, beat.instance_id)
            return
        if self.registry.observe(beat, time.monotonic()):
            log.info("%s %s joined (model %s)", beat.kind, beat.instance_id, beat.model)
        self.scheduler.on_heartbeat(beat)

    async def _on_submit(self, msg) -> None:
        started = time.perf_counter()
        try:
            request = decode(msg.data, GenerateRequest)
        except msgspec.ValidationError as exc:
            await msg.respond(encode(SubmitReply(is_accepted=False, error=ErrorInfo(
                message=f"malformed request: {exc}", type="invalid_request_error", http_status=400))))
            return
        token = request_id_var.set(request.request_id)
        try:
            reply = await self._place(request)
            await msg.respond(encode(reply))
        finally:
            request_id_var.reset(token)
        DECISION_SECONDS.observe(time.perf_counter() - started)
        status = "placed" if reply.is_accepted else "refused"
        DECISIONS.labels(status if reply.is_accepted else (reply.error.code or "refused")).inc()
        asyncio.get_running_loop().run_in_executor(
            self._journal_writer, self._record, request, status, reply)

    def _record(self, request: GenerateRequest, status: str, reply: SubmitReply) -> None:
        try:
            self.journal.record(request.request_id, request.model, len(request.prompt_token_ids), status,
                                request.arrival_time, reply.prefill_id, reply.decode_id,
                                reply.error.code if reply.error else None)
        except Exception as exc:  # NOTE: the journal is an audit trail; a failed write must not fail requests.
            log.warning("journal write failed for %s: %s", request.request_id, exc)

    async def _place(self, request: GenerateRequest) -> SubmitReply:
        now = time.monotonic()
        placement = self.scheduler.place(
            request.model, self.registry.alive("prefill", now), self.registry.alive("decode", now))
        if placement.error:
            log.warning("refused: %s", placement.error.message)
            return SubmitReply(is_accepted=False, error=placement.error)
        task = PrefillTask(request=request, decode_id=placement.decode_id,
                           decode_segment=placement.decode_segment)
        last_error = None
        for prefill_id in placement.prefill_ids[:MAX_PREFILL_ATTEMPTS]:
            try:
                reply = await self.nc.request(subjects.prefill_tasks(prefill_id), encode(task),
                                              timeout=self.settings.dispatch_timeout_s)
                ack = decode(reply.data, TaskAck)
            except Exception as exc:
                log.warning("prefill %s did not take the task (%r); dropping it from scheduling", prefill_id, exc)
                self.registry.remove(prefill_id)
                last_error = ErrorInfo(message=f"prefill {prefill_id} unreachable", type="service_unavailable",
                                       code="no_capacity", http_status=503)
                continue
            if ack.is_accepted:
                self.scheduler.on_placed(prefill_id, placement.decode_id)
                log.info("placed on prefill %s, decode %s", prefill_id, placement.decode_id)
                return SubmitReply(is_accepted=True, prefill_id=prefill_id, decode_id=placement.decode_id)
            last_error = ack.error
            if ack.error and 400 <= ack.error.http_status < 500:
                break
        return SubmitReply(is_accepted=False, error=last_error)

    def heartbeat(self, is_leaving: bool) -> Heartbeat:
        return Heartbeat(instance_id=self.instance_id, kind="conductor", sent_at=time.time(), is_leaving=is_leaving)

    async def run(self, stop: asyncio.Event) -> None:
        self.nc = await connect(self.settings.nats_url, self.instance_id)
        await self.nc.subscribe(subjects.HEARTBEAT_ALL, cb=self._on_heartbeat)
        await self.nc.subscribe(subjects.SUBMIT, queue=subjects.CONDUCTOR_QUEUE, cb=self._on_submit)
        beats = asyncio.create_task(heartbeat_forever(
            self.nc, subjects.heartbeat("conductor", self.instance_id), self.heartbeat,
            self.settings.heartbeat_interval_s, stop))
        log.info("conductor %s ready", self.instance_id)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            for iid in self.registry.expire(time.monotonic()):
                self.scheduler.forget(iid)
                log.warning("instance %s stopped heartbeating; dropped from scheduling", iid)
            for kind in ("prefill", "decode"):
                INSTANCES.labels(kind).set(len(self.registry.alive(kind, time.monotonic())))
        await beats
        await self.nc.drain()
        self._journal_writer.shutdown(wait=True)


def main(settings: Settings) -> None:
    """Runs one conductor until SIGINT/SIGTERM."""
    journal = RequestJournal(settings.database_url)
    service = ConductorService(settings, journal)

    def health() -> tuple[bool, dict]:
        return service.nc is not None and service.nc.is_connected, {"instance_id": service.instance_id}

    try:
        run_with_probe("conductor", settings.host, settings.metrics_port, service.run, health)
    finally:
        journal.close()
