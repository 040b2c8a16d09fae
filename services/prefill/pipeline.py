"""One prefill request's pipeline: load its cached prefix -> reserve decode KV -> prefill, each finished layer's KV
streaming into those blocks -> send the first token and hand over to decode -> store its new blocks in the pool.

Transport-free: what it asks of and tells others goes through the `PrefillBus` protocol (the service implements
it on NATS), so it runs in tests without a broker. Cancellation is checked in one place (`_check`, between the
stages, and `_should_stop` inside the forward); what a request holds when it ends (a reservation, a stream into
it) is freed in `run`'s `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from tsukimi.common.logs import request_id_var
from tsukimi.common.messages import (
    DecodeTask, ErrorInfo, KVReservation, KVReserve, PrefillTask, TaskAck, TokenEvent,
)
from tsukimi.common.settings import Settings
from tsukimi.model.sampler import sample
from tsukimi.prefill.calibration import PrefillCosts
from tsukimi.prefill.chunk_scheduler import ChunkScheduler
from tsukimi.prefill.engine import PrefillEngine, PrefillJob, PrefillStopped
from tsukimi.prefill.held_reservations import HeldReservations
from tsukimi.prefill.kv_stream import KVStream
from tsukimi.prefill.metrics import (
    CACHED_TOKENS, EXPOSED_SECONDS, OUTCOMES, PREFILL_SECONDS, PROMPT_TOKENS, RUNNING, STORED_BLOCKS, TRANSFER_BYTES,
    TRANSFER_SECONDS,
)
from tsukimi.transfer.engine import TransferError

log = logging.getLogger("tsukimi.prefill")

# Seconds between two reservation attempts while the decode worker's KV blocks are all in use.
RESERVE_RETRY_S = 0.05


class PrefillBus(Protocol):
    """What the pipeline sends (the service implements it on NATS)."""

    async def emit(self, event: TokenEvent) -> None:
        """Sends a token event to the request's gateway."""

    async def reserve(self, decode_id: str, ask: KVReserve) -> KVReservation:
        """The decode worker's reservation, or a refusal (also when it does not answer)."""

    async def release(self, decode_id: str, request_id: str) -> None:
        """Tells the decode worker to free the request's reservation."""

    async def hand_over(self, decode_id: str, task: DecodeTask) -> TaskAck:
        """The decode worker's answer to the hand-over, or a refusal (also when it does not answer)."""


class RequestCancelled(Exception):
    """The request was cancelled; the message says where that was noticed."""


@dataclass
class _Held:
    """What one request holds on the decode worker while it runs."""

    # True from an accepted reservation until it is handed over or released.
    is_reserved: bool = False
    # The writes into that reservation (None before the reservation and once handed over).
    stream: KVStream | None = None
    # Index of the next token event (1 once the first token went out).
    next_index: int = 0


class PrefillPipeline:
    """Runs prefill requests through their stages (several at once, each in its own task; their chunks share
    the engine's forwards through `chunks`)."""

    def __init__(self, settings: Settings, engine: PrefillEngine, chunks: ChunkScheduler, bus: PrefillBus,
                 runtime, held: HeldReservations, costs: PrefillCosts | None,
                 active: dict[str, tuple[float, PrefillJob | None]]):
        self.settings = settings
        self.engine = engine
        self.chunks = chunks
        self.bus = bus
        # The worker's runtime: `cancelled`, `cache`, `transfer`, `spawn`.
        self.runtime = runtime
        # Decode reservations held, renewed by the service while this worker lives.
        self.held = held
        self.costs = costs
        # Per request being prefilled: (predicted seconds of its whole forward, its job once computing).
        self.active = active

    def is_cancelled(self, rid: str) -> bool:
        return rid in self.runtime.cancelled

    def _check(self, rid: str, where: str) -> None:
        if self.is_cancelled(rid):
            raise RequestCancelled(where)

    async def run(self, task: PrefillTask) -> None:
        """Takes one request through every stage; any failure ends with an error event to its client."""
        rid = task.request.request_id
        token = request_id_var.set(rid)
        held = _Held()
        try:
            await self._stages(task, held)
        except RequestCancelled as exc:
            OUTCOMES.labels("cancelled").inc()
            log.info("%s", exc)
        except (PrefillStopped, TransferError):
            await self._fail_transfer(task, held.next_index, held.stream)
        except asyncio.CancelledError:
            await self.bus.emit(TokenEvent(request_id=rid, index=held.next_index, error=ErrorInfo(
                message="prefill worker shutting down", type="service_unavailable", code="worker_stopping",
                http_status=503)))
            raise
        except Exception as exc:  # NOTE: one bad request must not stop the worker; the client gets the error.
            log.exception("prefill failed")
            OUTCOMES.labels("failed").inc()
            await self.bus.emit(TokenEvent(request_id=rid, index=held.next_index, error=ErrorInfo(
                message=f"prefill failed: {exc}")))
        finally:
            self.active.pop(rid, None)
            RUNNING.set(len(self.active))
            if held.stream is not None:
                await self._release(task, held.stream)
            elif held.is_reserved:
                await self._release_blocks(task)
            request_id_var.reset(token)

    async def _stages(self, task: PrefillTask, held: _Held) -> None:
        request = task.request
        rid = request.request_id
        self._check(rid, "dropped before prefill: cancelled")
        started = time.perf_counter()
        num_tokens = len(request.prompt_token_ids)
        self.expect(rid, num_tokens, 0)
        prefix = None
        if self.runtime.cache is not None:
            prefix = await self.runtime.cache.load(request.prompt_token_ids, self.engine.block_layout(
                self.settings.cache_block_tokens))
        num_cached = prefix[0][0].shape[2] if prefix else 0
        self.expect(rid, num_tokens - num_cached, num_cached)
        if request.sampling.max_tokens > 1:
            held.stream = await self._reserve(task, held)
            if held.stream is None:
                return
        stream = held.stream
        layerwise = stream is not None and self.settings.kv_layerwise
        job = self.engine.start(request.prompt_token_ids, prefix, stream.send_layer if layerwise else None,
                                lambda: self._should_stop(rid, stream))
        self.active[rid] = (self.active[rid][0], job)
        try:
            await self.chunks.run(job, request.arrival_time + self.settings.ttft_slo_s)
        except PrefillStopped as exc:
            self._check(rid, f"prefill stopped: cancelled ({exc})")
            raise
        result, seconds = job.result, job.compute_s
        self.active.pop(rid, None)
        RUNNING.set(len(self.active))
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
        await self.bus.emit(TokenEvent(request_id=rid, index=0, token_id=first, finish_reason=reason,
                                       num_cached_tokens=num_cached))
        held.next_index = 1
        self._store_later(request.prompt_token_ids, result.kv, num_cached)
        if reason is not None:
            OUTCOMES.labels("finished").inc()
            return
        timing = await stream.finish(computed_at)
        self._check(rid, "cancelled after prefill: KV not handed over")
        TRANSFER_SECONDS.observe(timing.transfer_s)
        EXPOSED_SECONDS.observe(timing.exposed_s)
        TRANSFER_BYTES.inc(stream.num_tokens * self.engine.block_layout(1).num_bytes)
        await self._hand_over(task, first, stream)
        held.stream, held.is_reserved = None, False  # handed over: decode owns the blocks

    def _should_stop(self, rid: str, stream: KVStream | None) -> bool:
        """Polled by the forward between layers: cancelled, or a write into decode's blocks failed."""
        return self.is_cancelled(rid) or (stream is not None and stream.has_failed)

    def expect(self, rid: str, num_new_tokens: int, num_reused_tokens: int) -> None:
        """Notes the predicted time of `rid`'s prefill (for the service's `queued_prefill_s`)."""
        predicted = self.costs.model.prefill_s(num_new_tokens, num_reused_tokens) if self.costs else 0.0
        self.active[rid] = (predicted, None)
        RUNNING.set(len(self.active))

    async def _reserve(self, task: PrefillTask, held: _Held) -> KVStream | None:
        """Reserves blocks for the prompt's KV on the decode worker (asking again while they are all in use, up
        to `kv_reserve_wait_s`); None when refused (the client has been told)."""
        rid = task.request.request_id
        num_tokens = len(task.request.prompt_token_ids)
        deadline = time.monotonic() + self.settings.kv_reserve_wait_s
        while True:
            reservation = await self.bus.reserve(task.decode_id, KVReserve(request_id=rid, num_tokens=num_tokens))
            if reservation.is_accepted:
                self.held.add(task.decode_id, rid)
                held.is_reserved = True
                break
            if self.is_cancelled(rid):
                break
            if reservation.error is None or reservation.error.code != "kv_full" or time.monotonic() > deadline:
                break
            await asyncio.sleep(RESERVE_RETRY_S)
        self._check(rid, "cancelled while reserving decode KV")
        if not reservation.is_accepted:
            OUTCOMES.labels("reserve_failed").inc()
            await self.bus.emit(TokenEvent(request_id=rid, index=0, error=reservation.error))
            return None
        try:
            return KVStream(self.runtime.transfer, asyncio.get_running_loop(), task.decode_segment, reservation,
                            self.engine.block_layout(reservation.block_tokens), num_tokens)
        except ValueError as exc:
            held.is_reserved = False
            await self._release_blocks(task)
            OUTCOMES.labels("reserve_failed").inc()
            await self.bus.emit(TokenEvent(request_id=rid, index=0, error=ErrorInfo(message=str(exc))))
            return None

    async def _release(self, task: PrefillTask, stream: KVStream) -> None:
        """Frees the decode blocks of a request that will not be handed over, once no write is in flight."""
        await stream.settle()
        stream.close()
        await self._release_blocks(task)

    async def _release_blocks(self, task: PrefillTask) -> None:
        """Tells the decode worker to free the blocks it reserved for `task` (no write into them is in flight)."""
        self.held.discard(task.decode_id, task.request.request_id)
        await self.bus.release(task.decode_id, task.request.request_id)

    async def _fail_transfer(self, task: PrefillTask, next_index: int, stream: KVStream | None) -> None:
        error = "stopped" if stream is None else "failed"
        try:
            if stream is not None:
                await stream.finish(time.perf_counter())
        except Exception as exc:
            error = str(exc)
        log.warning("KV transfer to %s failed: %s", task.decode_id, error)
        OUTCOMES.labels("transfer_failed").inc()
        await self.bus.emit(TokenEvent(request_id=task.request.request_id, index=next_index, error=ErrorInfo(
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
            ack = await self.bus.hand_over(task.decode_id, handoff)
        finally:
            # NOTE: once decode answers, it has taken the reservation or freed it; if it does not, its TTL frees it.
            self.held.discard(task.decode_id, rid)
        if not ack.is_accepted:
            OUTCOMES.labels("handoff_failed").inc()
            if not self.is_cancelled(rid):
                await self.bus.emit(TokenEvent(request_id=rid, index=1, error=ack.error))
            return
        OUTCOMES.labels("handed_over").inc()

    def _store_later(self, prompt: list[int], kv, num_cached: int) -> None:
        """Writes the prompt's new full blocks to the pool in the background (the next prompt needs no wait)."""
        cache = self.runtime.cache
        if cache is None or not cache.is_available:
            return

        async def store() -> None:
            try:
                STORED_BLOCKS.inc(await cache.store(prompt, kv, num_cached // self.settings.cache_block_tokens))
            except Exception as exc:  # NOTE: storing is best effort; the request is already served.
                log.warning("storing KV blocks failed: %s", exc)

        self.runtime.spawn(store())
