"""One request's token stream: ordering the workers' TokenEvents, turning them into text, and ending it.

Transport-free: the bus (see `service.GatewayBus`) is reached through the `Bus` and `TokenStream` protocols.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

import anyio
from tsukimi.common.messages import ErrorInfo, GenerateRequest, SubmitReply, TokenEvent
from tsukimi.gateway import errors, metrics
from tsukimi.text.detokenizer import Detokenizer

log = logging.getLogger(__name__)

# Seconds between two checks that the workers holding a request are still alive.
WORKER_CHECK_INTERVAL_S = 1.0


class TokenStream(Protocol):
    """The TokenEvents of one request, in index order (error events as soon as they arrive)."""

    async def next_event(self, timeout_s: float) -> TokenEvent:
        """The next event; raises `TimeoutError` when none comes within `timeout_s`."""
        ...

    async def close(self) -> None:
        """Stops receiving (unsubscribes); idempotent."""
        ...


class Bus(Protocol):
    """What the gateway needs from the message bus."""

    async def submit(self, request: GenerateRequest) -> SubmitReply:
        """Asks the conductor to place a request; a failure to reach it comes back as a refused reply."""
        ...

    async def open_stream(self, request_id: str) -> TokenStream:
        """Starts receiving a request's TokenEvents; call before `submit` so none is missed."""
        ...

    async def cancel(self, request_id: str, reason: str) -> None:
        """Tells every worker and conductor to drop a request."""
        ...

    def is_ready(self) -> tuple[bool, dict]:
        """Whether requests can be served (a prefill and a decode instance are alive), with details."""
        ...

    def is_lost(self, instance_id: str) -> bool:
        """True when an instance once heard from has left or stopped heartbeating."""
        ...


class EventOrderer:
    """Reorders the TokenEvents of one request by `index`: prefill sends index 0, decode sends 1, 2, ..."""

    def __init__(self) -> None:
        self._next = 0
        self._pending: dict[int, TokenEvent] = {}

    def push(self, event: TokenEvent) -> list[TokenEvent]:
        """Events deliverable now, in order. An error event ends the request and is delivered at once."""
        if event.error is not None:
            return [event]
        if event.index < self._next or event.index in self._pending:
            log.debug("dropping duplicate event %d", event.index)
            return []
        self._pending[event.index] = event
        ready = []
        while self._next in self._pending:
            ready.append(self._pending.pop(self._next))
            self._next += 1
        return ready

    @property
    def num_buffered(self) -> int:
        """Events waiting for an earlier index."""
        return len(self._pending)


class GenerationError(Exception):
    """The request failed after it was accepted (worker error, stream timeout)."""

    def __init__(self, info: ErrorInfo):
        super().__init__(info.message)
        self.info = info


class Generation:
    """One accepted request's output: consumes its TokenEvents, yields text, and ends it cleanly.

    `close()` must run on every exit path; it unsubscribes and, unless the workers finished the request
    themselves, publishes a CancelRequest (client gone, stop string, timeout, error).
    """

    def __init__(
        self,
        request_id: str,
        stream: TokenStream,
        bus: Bus,
        detokenizer: Detokenizer,
        *,
        max_tokens: int,
        timeout_s: float,
        arrival: float,
    ):
        self.request_id = request_id
        self._stream = stream
        self._bus = bus
        self._detok = detokenizer
        self._max_tokens = max_tokens
        self._timeout_s = timeout_s
        # time.monotonic() of the request's arrival.
        self._arrival = arrival
        self._last_token_at: float | None = None
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        # The output's token ids, in order.
        self.output_ids: list[int] = []
        self.cached_tokens = 0
        # True when the workers are done with it (finished, or never accepted it): no cancel needed.
        self._workers_done = False
        self._cancel_reason: str | None = None
        self._closed = False
        # Workers holding the request, watched while waiting for tokens.
        self._prefill_id: str | None = None
        self._decode_id: str | None = None

    def watch_workers(self, prefill_id: str | None, decode_id: str | None) -> None:
        """Fail the request early (503) if one of these instances stops while it still needs it."""
        self._prefill_id, self._decode_id = prefill_id, decode_id

    def mark_rejected(self) -> None:
        """The conductor refused the request: nobody works on it."""
        self._workers_done = True

    @property
    def text(self) -> str:
        return self._detok.text

    @property
    def is_cut_by_stop_string(self) -> bool:
        """True when a stop string ended the text (tokens generated after its start are not in it)."""
        return self._detok.is_stopped

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces as they become final; on return `finish_reason` is set. Raises `GenerationError`."""
        while True:
            event = await self._next_event()
            if event.error is not None:
                self._cancel_reason = "error"
                raise GenerationError(event.error)
            if event.index == 0:
                self.cached_tokens = event.num_cached_tokens
            text = ""
            if event.token_id is not None:
                self._observe_token()
                self.output_ids.append(event.token_id)
                text = self._detok.push(event.token_id)
                if self._detok.is_stopped:
                    self.finish_reason = "stop"
                    if event.finish_reason is None:
                        self._cancel_reason = "stop_string"
                    else:
                        self._workers_done = True
                    if text:
                        yield text
                    return
            if event.finish_reason is not None or self.completion_tokens >= self._max_tokens:
                if event.finish_reason is None:
                    # NOTE: the workers should have ended it themselves; make sure they stop.
                    self._cancel_reason = "length"
                else:
                    self._workers_done = True
                text += self._detok.flush()
                self.finish_reason = "stop" if self._detok.is_stopped else (event.finish_reason or "length")
                if text:
                    yield text
                return
            if text:
                yield text

    async def _next_event(self) -> TokenEvent:
        """The next event, waiting at most the stream timeout and failing early when a needed worker is lost."""
        deadline = time.monotonic() + self._timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                return await self._stream.next_event(max(0.0, min(WORKER_CHECK_INTERVAL_S, left)))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    self._cancel_reason = "timeout"
                    raise GenerationError(errors.stream_timeout(self._timeout_s)) from None
            # NOTE: prefill matters until decode has produced a token (it may still be handing the KV over).
            needed = [self._decode_id] + ([self._prefill_id] if self.completion_tokens <= 1 else [])
            for instance_id in needed:
                if instance_id and self._bus.is_lost(instance_id):
                    self._cancel_reason = "worker_lost"
                    raise GenerationError(errors.worker_lost(instance_id))

    def _observe_token(self) -> None:
        now = time.monotonic()
        if self._last_token_at is None:
            metrics.TIME_TO_FIRST_TOKEN.observe(now - self._arrival)
        else:
            metrics.INTER_TOKEN_LATENCY.observe(now - self._last_token_at)
        self._last_token_at = now
        self.completion_tokens += 1
        metrics.GENERATION_TOKENS.inc()

    async def close(self, reason: str = "client_disconnected") -> None:
        """Unsubscribes and cancels the request on the workers unless they finished it; idempotent.

        `reason` is used when no more specific one is known (the caller stopped consuming early).
        """
        if self._closed:
            return
        self._closed = True
        # NOTE: shielded so the cleanup completes even when the caller is being cancelled (client gone).
        with anyio.CancelScope(shield=True):
            try:
                await self._stream.close()
            except Exception:
                log.warning("closing the token stream failed", exc_info=True)
            if self._workers_done:
                return
            why = self._cancel_reason or reason
            try:
                await self._bus.cancel(self.request_id, why)
                metrics.CANCELS.labels(reason=why).inc()
                log.info("cancelled request: %s", why)
            except Exception:
                log.warning("publishing the cancel failed", exc_info=True)
