"""Prefill worker process: computes prompts' KV and first tokens, hands each request to its decode worker.

The loop reads as: take the next task and run it through its pipeline (`pipeline.py`: reserve decode blocks,
prefill, its chunks taking turns with, or when short packed into one forward with, the other requests in
progress, while each finished layer's KV streams into those blocks, send the first token, hand over). This file
is the pipeline's NATS side (`PrefillBus`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque

import msgspec

from tsukimi.common import subjects
from tsukimi.common.messages import (
    DecodeTask, ErrorInfo, Heartbeat, KVRelease, KVRenew, KVReservation, KVReserve, PrefillStatus, PrefillTask,
    TaskAck, TokenEvent, decode, encode,
)
from tsukimi.common.service_runtime import run_with_probe
from tsukimi.common.settings import Settings
from tsukimi.model.loader import load_model
from tsukimi.model.spec import max_model_len
from tsukimi.prefill.calibration import PrefillCosts, measure
from tsukimi.prefill.chunk_scheduler import ChunkScheduler
from tsukimi.prefill.engine import PrefillEngine, PrefillJob
from tsukimi.prefill.held_reservations import HeldReservations
from tsukimi.prefill.metrics import QUEUED
from tsukimi.prefill.pipeline import PrefillPipeline
from tsukimi.kvpool.prefix_cache import PrefixCache
from tsukimi.transfer.engine import TransferEngine
from tsukimi.worker.runtime import WorkerRuntime, prepare_worker

log = logging.getLogger("tsukimi.prefill")

class PrefillService:
    """The bus- and socket-facing side of a prefill worker."""

    def __init__(self, settings: Settings, engine: PrefillEngine, max_len: int, costs: PrefillCosts | None = None,
                 cache=None, colocated_with: str = ""):
        self.settings = settings
        self.engine = engine
        self.max_model_len = max_len
        # Cost model fitted at start-up and corrected by every prefill; None: not calibrated, none published.
        self.costs = costs
        self.host = socket.gethostname()
        self.instance_id = settings.instance_name("prefill")
        self.queue: asyncio.Queue[PrefillTask] = asyncio.Queue(settings.max_prefill_queue)
        # Prompt lengths of the queued tasks, in queue order (their predicted time is published).
        self._queued_lengths: deque[int] = deque()
        # Per request being prefilled: (predicted seconds of its whole forward, its job once computing).
        self._active: dict[str, tuple[float, PrefillJob | None]] = {}
        # Their tasks (at most `prefill_max_active`), whose chunks share the device's forwards.
        self._tasks: set[asyncio.Task] = set()
        # NOTE: deadlines are on the gateway's wall clock (requests' arrival_time); hosts' clocks are assumed in sync.
        self.chunks = ChunkScheduler(engine.step, engine.chunk_tokens, settings.prefill_pack_tokens,
                                     self._predict_s if costs is not None else None)
        # Start-up, cancellations, background stores of new KV blocks, shutdown; the transfer engine and the
        # prefix cache (`cache`: the colocated worker's in-process one, or the pool's made at start-up).
        self.runtime = WorkerRuntime(settings, self.instance_id, cache)
        # Colocated worker: id of the decode half of this process ("" when disaggregated).
        self.colocated_with = colocated_with
        # Decode reservations held (reserved, not yet handed over or released): renewed while this worker lives.
        self.held = HeldReservations()
        # Each request's way through its stages; this service is its bus.
        self.pipeline = PrefillPipeline(settings, engine, self.chunks, self, self.runtime, self.held, costs,
                                        self._active)
        self.nc = None

    def heartbeat(self, is_leaving: bool) -> Heartbeat:
        return Heartbeat(
            instance_id=self.instance_id, model=self.settings.model_name(),
            status=PrefillStatus(num_waiting=self.queue.qsize(), num_running=self.num_running,
                                 max_running=self.settings.prefill_max_active,
                                 queued_prefill_s=self.queued_prefill_s()),
            max_model_len=self.max_model_len, sent_at=time.time(), is_leaving=is_leaving, host=self.host,
            cost_model=self.costs.model if self.costs else None, colocated_with=self.colocated_with,
        )

    @property
    def transfer(self) -> TransferEngine | None:
        return self.runtime.transfer

    @property
    def cache(self) -> PrefixCache | None:
        return self.runtime.cache

    @property
    def cancelled(self):
        """Requests cancelled recently; a cancel may arrive before its task, so it is remembered for a while."""
        return self.runtime.cancelled

    @property
    def num_running(self) -> int:
        """Requests being prefilled (their chunks share forwards)."""
        return len(self._active)

    def _predict_s(self, num_new_tokens: int, num_reused_tokens: int) -> float:
        return self.costs.model.prefill_s(num_new_tokens, num_reused_tokens)

    def queued_prefill_s(self) -> float:
        """Predicted seconds until this worker is idle: every queued prompt (as if nothing of it were cached)
        plus what remains of the ones in progress; 0 without a cost model."""
        if self.costs is None:
            return 0.0
        model = self.costs.model
        total = sum(model.prefill_s(n) for n in self._queued_lengths)
        for predicted, job in list(self._active.values()):
            share = job.num_remaining / max(1, job.num_remaining + job.num_computed) if job is not None else 1.0
            total += predicted * share
        return total

    async def _on_task(self, msg) -> None:
        try:
            task = decode(msg.data, PrefillTask)
        except msgspec.ValidationError as exc:
            await msg.respond(encode(TaskAck(is_accepted=False, error=ErrorInfo(message=f"bad task: {exc}"))))
            return
        if len(task.request.prompt_token_ids) >= self.max_model_len:
            error = ErrorInfo(message="prompt longer than the model's context", type="invalid_request_error",
                              code="context_length_exceeded", http_status=400)
            await msg.respond(encode(TaskAck(is_accepted=False, error=error)))
            return
        try:
            self.queue.put_nowait(task)
            self._queued_lengths.append(len(task.request.prompt_token_ids))
        except asyncio.QueueFull:
            error = ErrorInfo(message="prefill queue full", type="service_unavailable", code="busy", http_status=503)
            await msg.respond(encode(TaskAck(is_accepted=False, error=error)))
            return
        QUEUED.set(self.queue.qsize())
        await msg.respond(encode(TaskAck(is_accepted=True)))

    async def run(self, stop: asyncio.Event) -> None:
        self.nc = await self.runtime.start()
        await self.runtime.open_cache(PrefixCache)
        await self.nc.subscribe(subjects.prefill_tasks(self.instance_id), cb=self._on_task)
        await self.runtime.follow_cancels()
        self.runtime.beat("prefill", self.heartbeat, self.settings.heartbeat_interval_s, stop)
        self.runtime.loop(self._renew_forever(stop))
        log.info("prefill %s ready", self.instance_id)
        while not stop.is_set():
            if len(self._tasks) >= self.settings.prefill_max_active:
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait([stopping, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                continue
            getter = asyncio.create_task(self.queue.get())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([getter, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not getter.done():
                getter.cancel()
                break
            self._queued_lengths.popleft()
            QUEUED.set(self.queue.qsize())
            task = asyncio.create_task(self.pipeline.run(getter.result()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self.runtime.shutdown(self._stop_taking_work)

    async def _stop_taking_work(self) -> None:
        """Fails the queued tasks and ends the ones in progress (their clients are told)."""
        await self._fail_queued("prefill worker shutting down")
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _renew_forever(self, stop: asyncio.Event) -> None:
        """Every `kv_orphan_ttl_s` / 4, tells each decode worker which of its reservations this worker still holds
        (so a slow prefill's blocks are not freed under its writes; a dead one's are, after the TTL)."""
        interval = self.settings.kv_orphan_ttl_s / 4
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
                return
            except asyncio.TimeoutError:
                pass
            for decode_id, request_ids in self.held.by_decode().items():
                try:
                    await self.nc.publish(subjects.decode_renew(decode_id), encode(KVRenew(request_ids=request_ids)))
                except Exception as exc:  # NOTE: a missed renewal must not stop the next ones.
                    log.warning("renewing KV reservations on %s failed: %r", decode_id, exc)

    async def emit(self, event: TokenEvent) -> None:
        await self.nc.publish(subjects.stream(event.request_id), encode(event))

    async def reserve(self, decode_id: str, ask: KVReserve) -> KVReservation:
        return await self._ask_decode(decode_id, subjects.decode_reserve(decode_id), ask, KVReservation)

    async def release(self, decode_id: str, request_id: str) -> None:
        await self.nc.publish(subjects.decode_release(decode_id), encode(KVRelease(request_id=request_id)))

    async def hand_over(self, decode_id: str, task: DecodeTask) -> TaskAck:
        return await self._ask_decode(decode_id, subjects.decode_tasks(decode_id), task, TaskAck)

    async def _ask_decode(self, decode_id: str, subject: str, message, reply_type):
        """The decode worker's reply to `message`, or a refusal of `reply_type` when it does not answer."""
        try:
            reply = await self.nc.request(subject, encode(message), timeout=self.settings.dispatch_timeout_s)
            return decode(reply.data, reply_type)
        except Exception as exc:
            return reply_type(is_accepted=False, error=ErrorInfo(
                message=f"decode worker {decode_id} did not answer: {exc!r}", type="service_unavailable",
                code="decode_unavailable", http_status=503))

    async def _fail_queued(self, message: str) -> None:
        while not self.queue.empty():
            task = self.queue.get_nowait()
            self._queued_lengths.popleft()
            await self.emit(TokenEvent(request_id=task.request.request_id, index=0, error=ErrorInfo(
                message=message, type="service_unavailable", code="worker_stopping", http_status=503)))


def main(settings: Settings) -> None:
    """Runs one prefill worker until SIGINT/SIGTERM."""
    prepare_worker(settings, "prefill")
    engine = PrefillEngine(load_model(settings.model), settings.prefill_chunk_tokens)
    max_len = max_model_len(settings.model)
    # NOTE: calibration (~2-3 s: 3 shapes, more within its budget) runs before the worker serves, so its
    # timings are not disturbed by requests and the first heartbeat already carries a cost model.
    service = PrefillService(settings, engine, max_len, measure(engine, max_len))

    def health() -> tuple[bool, dict]:
        return service.nc is not None and service.nc.is_connected, {
            "instance_id": service.instance_id, "waiting": service.queue.qsize()}

    run_with_probe("prefill", settings.host, settings.metrics_port, service.run, health)
