"""Prefill worker process: computes prompts' KV and first tokens, hands each request to its decode worker.

The loop reads as: take the next task, reserve decode blocks, run it (its chunks taking turns with, or when short
packed into one forward with, the other requests in progress) while each finished layer's KV streams into those blocks, send the first token, hand over.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from tsukimi.common import subjects
from tsukimi.common.logs import request_id_var
from tsukimi.common.messages import (
    DecodeTask, ErrorInfo, Heartbeat, KVRelease, KVRenew, KVReservation, KVReserve, PrefillStatus,
    PrefillTask, TaskAck, TokenEvent, decode, encode,
)
from tsukimi.common.service_runtime import run_with_probe
from tsukimi.common.settings import Settings
from tsukimi.model.loader import load_model
from tsukimi.model.sampler import sample
from tsukimi.model.spec import max_model_len
from tsukimi.prefill.calibration import PrefillCosts, measure
from tsukimi.prefill.chunk_scheduler import ChunkScheduler
from tsukimi.prefill.engine import PrefillEngine, PrefillJob, PrefillStopped
from tsukimi.prefill.held_reservations import HeldReservations
from tsukimi.prefill.kv_stream import KVStream
from tsukimi.prefill.prefix_cache import PrefixCache
from tsukimi.transfer.engine import TransferEngine, TransferError
from tsukimi.worker.runtime import WorkerRuntime, prepare_worker

log = logging.getLogger("tsukimi.prefill")

# Seconds between two reservation attempts while the decode worker's KV blocks are all in use.
RESERVE_RETRY_S = 0.05

QUEUED = Gauge("tsukimi_prefill_waiting_requests", "Prefill tasks queued")
RUNNING = Gauge("tsukimi_prefill_running_requests", "Prefill tasks computing")
PREFILL_SECONDS = Histogram("tsukimi_prefill_seconds", "Forward time of one prompt",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
TRANSFER_SECONDS = Histogram("tsukimi_prefill_kv_transfer_seconds",
                             "Time from one request's first KV write to decode to its last one done",
                             buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
EXPOSED_SECONDS = Histogram("tsukimi_prefill_kv_transfer_exposed_seconds",
                            "Part of a request's KV transfer after its forward ended (not hidden behind compute)",
                            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
TRANSFER_BYTES = Counter("tsukimi_prefill_kv_transfer_bytes_total", "KV bytes sent to decode workers")
PROMPT_TOKENS = Counter("tsukimi_prefill_prompt_tokens_total", "Prompt tokens computed")
CACHED_TOKENS = Counter("tsukimi_prefill_cached_tokens_total", "Prompt tokens loaded from the KV pool instead")
STORED_BLOCKS = Counter("tsukimi_prefill_stored_blocks_total", "KV blocks written to the pool")
OUTCOMES = Counter("tsukimi_prefill_requests_total", "Prefill tasks by outcome", ["outcome"])


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
            task = asyncio.create_task(self._process(getter.result()))
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

    async def _process(self, task: PrefillTask) -> None:
        request = task.request
        rid = request.request_id
        token = request_id_var.set(rid)
        next_index = 0
        stream: KVStream | None = None
        try:
            if rid in self.cancelled:
                OUTCOMES.labels("cancelled").inc()
                log.info("dropped before prefill: cancelled")
                return
            started = time.perf_counter()
            num_tokens = len(request.prompt_token_ids)
            self._expect(rid, num_tokens, 0)
            prefix = None
            if self.cache is not None:
                prefix = await self.cache.load(request.prompt_token_ids, self.engine.block_layout(
                    self.settings.cache_block_tokens))
            num_cached = prefix[0][0].shape[2] if prefix else 0
            self._expect(rid, num_tokens - num_cached, num_cached)
            if request.sampling.max_tokens > 1:
                stream = await self._open_stream(task)
                if stream is None:
                    return
            layerwise = stream is not None and self.settings.kv_layerwise
            job = self.engine.start(request.prompt_token_ids, prefix, stream.send_layer if layerwise else None,
                                    lambda: rid in self.cancelled or (stream is not None and stream.has_failed))
            self._active[rid] = (self._active[rid][0], job)
            await self.chunks.run(job, request.arrival_time + self.settings.ttft_slo_s)
            result, seconds = job.result, job.compute_s
            self._active.pop(rid, None)
            RUNNING.set(self.num_running)
            computed_at = time.perf_counter()
            if stream is not None and not layerwise:
                stream.send_all(result.kv)
            if self.costs is not None:
                self.costs.observe(num_tokens - num_cached, num_cached, seconds)
            PREFILL_SECONDS.observe(computed_at - started)
            PROMPT_TOKENS.inc(num_tokens - num_cached)
            CACHED_TOKENS.inc(num_cached)
            first = sample(result.logits, request.sampling, 0)
            reason = None
            if first in request.sampling.stop_token_ids:
                reason = "stop"
            elif request.sampling.max_tokens <= 1:
                reason = "length"
            await self._emit(TokenEvent(request_id=rid, index=0, token_id=first, finish_reason=reason,
                                        num_cached_tokens=num_cached))
            next_index = 1
            self._store_later(request.prompt_token_ids, result.kv, num_cached)
            if reason is not None:
                OUTCOMES.labels("finished").inc()
                return
            timing = await stream.finish(computed_at)
            if rid in self.cancelled:
                OUTCOMES.labels("cancelled").inc()
                log.info("cancelled after prefill: KV not handed over")
                return
            TRANSFER_SECONDS.observe(timing.transfer_s)
            EXPOSED_SECONDS.observe(timing.exposed_s)
            TRANSFER_BYTES.inc(stream.num_tokens * self.engine.block_layout(1).num_bytes)
            await self._hand_over(task, first, stream)
            stream = None  # handed over: decode owns the blocks
        except PrefillStopped as exc:
            if rid in self.cancelled:
                OUTCOMES.labels("cancelled").inc()
                log.info("prefill stopped: cancelled (%s)", exc)
            else:
                await self._fail_transfer(task, next_index, stream)
        except TransferError:
            await self._fail_transfer(task, next_index, stream)
        except asyncio.CancelledError:
            await self._emit(TokenEvent(request_id=rid, index=next_index, error=ErrorInfo(
                message="prefill worker shutting down", type="service_unavailable", code="worker_stopping",
                http_status=503)))
            raise
        except Exception as exc:  # NOTE: one bad request must not stop the worker; the client gets the error.
            log.exception("prefill failed")
            OUTCOMES.labels("failed").inc()
            await self._emit(TokenEvent(request_id=rid, index=next_index, error=ErrorInfo(
                message=f"prefill failed: {exc}")))
        finally:
            self._active.pop(rid, None)
            RUNNING.set(self.num_running)
            if stream is not None:
                await self._release(task, stream)
            request_id_var.reset(token)

    def _expect(self, rid: str, num_new_tokens: int, num_reused_tokens: int) -> None:
        """Notes the predicted time of `rid`'s prefill (for `queued_prefill_s`)."""
        predicted = self.costs.model.prefill_s(num_new_tokens, num_reused_tokens) if self.costs else 0.0
        self._active[rid] = (predicted, None)
        RUNNING.set(self.num_running)

    async def _open_stream(self, task: PrefillTask) -> KVStream | None:
        """Reserves blocks for the prompt's KV on the decode worker (asking again while they are all in use, up
        to `kv_reserve_wait_s`); None when refused (the client has been told) or cancelled meanwhile."""
        rid = task.request.request_id
        num_tokens = len(task.request.prompt_token_ids)
        deadline = time.monotonic() + self.settings.kv_reserve_wait_s
        while True:
            reservation = await self._ask_decode(task.decode_id, subjects.decode_reserve(task.decode_id),
                                                 KVReserve(request_id=rid, num_tokens=num_tokens), KVReservation)
            if reservation.is_accepted:
                self.held.add(task.decode_id, rid)
                break
            if rid in self.cancelled:
                break
            if reservation.error is None or reservation.error.code != "kv_full" or time.monotonic() > deadline:
                break
            await asyncio.sleep(RESERVE_RETRY_S)
        if rid in self.cancelled:
            OUTCOMES.labels("cancelled").inc()
            if reservation.is_accepted:
                await self._release_blocks(task)
            return None
        if not reservation.is_accepted:
            OUTCOMES.labels("reserve_failed").inc()
            await self._emit(TokenEvent(request_id=rid, index=0, error=reservation.error))
            return None
        try:
            return KVStream(self.transfer, asyncio.get_running_loop(), task.decode_segment, reservation,
                            self.engine.block_layout(reservation.block_tokens), num_tokens)
        except ValueError as exc:
            await self._release_blocks(task)
            OUTCOMES.labels("reserve_failed").inc()
            await self._emit(TokenEvent(request_id=rid, index=0, error=ErrorInfo(message=str(exc))))
            return None

    async def _release(self, task: PrefillTask, stream: KVStream) -> None:
        """Frees the decode blocks of a request that will not be handed over, once no write is in flight."""
        await stream.settle()
        stream.close()
        await self._release_blocks(task)

    async def _release_blocks(self, task: PrefillTask) -> None:
        """Tells the decode worker to free the blocks it reserved for `task` (no write into them is in flight)."""
        self.held.discard(task.decode_id, task.request.request_id)
        await self.nc.publish(subjects.decode_release(task.decode_id),
                              encode(KVRelease(request_id=task.request.request_id)))

    async def _fail_transfer(self, task: PrefillTask, next_index: int, stream: KVStream | None) -> None:
        rid = task.request.request_id
        error = "stopped" if stream is None else "failed"
        try:
            if stream is not None:
                await stream.finish(time.perf_counter())
        except Exception as exc:
            error = str(exc)
        log.warning("KV transfer to %s failed: %s", task.decode_id, error)
        OUTCOMES.labels("transfer_failed").inc()
        await self._emit(TokenEvent(request_id=rid, index=next_index, error=ErrorInfo(
            message=f"KV transfer to decode failed: {error}", type="service_unavailable", code="kv_transfer_failed",
            http_status=503)))

    async def _hand_over(self, task: PrefillTask, first: int, stream: KVStream) -> None:
        """Tells the decode worker its blocks hold the request's KV: the request continues there."""
        rid = task.request.request_id
        stream.close()
        layout = self.engine.block_layout(stream.num_tokens)
        handoff = DecodeTask(request=task.request, first_token_id=first, num_kv_tokens=stream.num_tokens,
                             kv_layout=layout)
        try:
            ack = await self._ask_decode(task.decode_id, subjects.decode_tasks(task.decode_id), handoff, TaskAck)
        finally:
            # NOTE: once decode answers, it has taken the reservation or freed it; if it does not, its TTL frees it.
            self.held.discard(task.decode_id, rid)
        if not ack.is_accepted:
            OUTCOMES.labels("handoff_failed").inc()
            if rid not in self.cancelled:
                await self._emit(TokenEvent(request_id=rid, index=1, error=ack.error))
            return
        OUTCOMES.labels("handed_over").inc()

    async def _ask_decode(self, decode_id: str, subject: str, message, reply_type):
        """The decode worker's reply to `message`, or a refusal of `reply_type` when it does not answer."""
        try:
            reply = await self.nc.request(subject, encode(message), timeout=self.settings.dispatch_timeout_s)
            return decode(reply.data, reply_type)
        except Exception as exc:
            return reply_type(is_accepted=False, error=ErrorInfo(
                message=f"decode worker {decode_id} did not answer: {exc!r}", type="service_unavailable",
                code="decode_unavailable", http_status=503))

    def _store_later(self, prompt: list[int], kv, num_cached: int) -> None:
        """Writes the prompt's new full blocks to the pool in the background (the next prompt needs no wait)."""
        if self.cache is None or not self.cache.is_available:
            return

        async def store() -> None:
            try:
                STORED_BLOCKS.inc(await self.cache.store(prompt, kv, num_cached // self.settings.cache_block_tokens))
            except Exception as exc:  # NOTE: storing is best effort; the request is already served.
                log.warning("storing KV blocks failed: %s", exc)

        self.runtime.spawn(store())

    async def _emit(self, event: TokenEvent) -> None:
        await self.nc.publish(subjects.stream(event.request_id), encode(event))

    async def _fail_queued(self, message: str) -> None:
        while not self.queue.empty():
            task = self.queue.get_nowait()
            self._queued_lengths.popleft()
            await self._emit(TokenEvent(request_id=task.request.request_id, index=0, error=ErrorInfo(
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
