"""Serving one completion or chat request: tokenize, admit, submit, stream or collect the output, clean up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from tsukimi.common.messages import ErrorInfo, GenerateRequest, SamplingParams
from tsukimi.common.settings import Settings
from tsukimi.gateway import errors, metrics, protocol
from tsukimi.gateway.answer_memory import AnswerMemory, answer_ids
from tsukimi.gateway.errors import APIError, invalid_request
from tsukimi.gateway.event_stream import EventStreamResponse
from tsukimi.gateway.protocol import ChatCompletionRequest, CompletionRequest
from tsukimi.gateway.stream import Bus, Generation, GenerationError
from tsukimi.text.chat_template import TemplateError
from tsukimi.text.detokenizer import Detokenizer
from tsukimi.text.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# Completions' default output limit when the request gives none (OpenAI's legacy default).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Status recorded for a request whose client went away before it ended (nginx's convention).
CLIENT_CLOSED = 499
SEED_BITS = 63


@dataclass
class _Call:
    """One request being served."""

    request_id: str
    is_chat: bool
    model: str
    arrival: float
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_ids: list[int] = field(default_factory=list)
    include_usage: bool = False
    generation: Generation | None = None
    # Status the request ended with (recorded in metrics by the request middleware).
    status: int | None = None
    is_finished: bool = False

    @property
    def response_id(self) -> str:
        return f"{'chatcmpl' if self.is_chat else 'cmpl'}-{self.request_id}"

    @property
    def endpoint(self) -> str:
        return "/v1/chat/completions" if self.is_chat else "/v1/completions"

    def usage(self) -> dict:
        gen = self.generation
        return protocol.usage(
            len(self.prompt_ids), gen.completion_tokens if gen else 0, gen.cached_tokens if gen else 0
        )


class _ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class Completions:
    """Serves /v1/completions and /v1/chat/completions over a `Bus`."""

    def __init__(self, settings: Settings, bus: Bus, tokenizer: TextTokenizer):
        self._settings = settings
        self._bus = bus
        self._tokenizer = tokenizer
        self.model_name = settings.model_name()
        self.max_model_len = tokenizer.max_model_len
        self._vocab_size = tokenizer.vocab_size
        # Request ids admitted and not finished (an id names a NATS subject, so it must be unique).
        self._active: set[str] = set()
        self.answers = AnswerMemory(settings.answer_memory_bytes)

    @property
    def num_in_flight(self) -> int:
        return len(self._active)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    async def handle(self, request: Request, body: CompletionRequest | ChatCompletionRequest) -> Response:
        """Serves one request: the response, or an `APIError` raised before any output was sent."""
        state = request.state
        call = _Call(
            request_id=state.request_id,
            is_chat=isinstance(body, ChatCompletionRequest),
            model=self.model_name,
            arrival=getattr(state, "arrival", time.monotonic()),
            include_usage=body.include_usage,
        )
        self.check_model(body.model)
        self._admit(call.request_id)
        metrics.IN_FLIGHT.inc()
        is_handed_over = False
        try:
            call.prompt_ids = await run_in_threadpool(self._prompt_ids, body)
            sampling = self._sampling(body, len(call.prompt_ids))
            await self._start(call, sampling, body.stop or [])
            if body.is_stream:
                response = EventStreamResponse(
                    self._events(call), cleanup=lambda: self._finish(call, request)
                )
                is_handed_over = True
                return response
            return await self._collect(call, request)
        except asyncio.CancelledError:
            call.status = CLIENT_CLOSED
            raise
        except APIError as exc:
            call.status = exc.status
            raise
        except Exception:
            call.status = 500
            raise
        finally:
            if not is_handed_over:
                await self._finish(call, request)

    # ---- admission and preparation -------------------------------------------------------------------------

    def _admit(self, request_id: str) -> None:
        if len(self._active) >= self._settings.max_inflight_requests:
            raise APIError(
                429,
                f"too many requests in flight (limit {self._settings.max_inflight_requests}); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self._active.add(request_id)

    def _prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        """Token ids of the prompt (runs in a worker thread: tokenizing and templating take CPU)."""
        if isinstance(body, ChatCompletionRequest):
            known = self._known_ids if self.answers.is_enabled else None
            try:
                ids = self._tokenizer.encode_chat([m.for_template() for m in body.messages], known)
            except TemplateError as exc:
                raise invalid_request(str(exc), param="messages", code="invalid_chat_template") from None
            param = "messages"
        elif isinstance(body.prompt, str):
            ids = self._tokenizer.encode(body.prompt)
            param = "prompt"
        else:
            ids = list(body.prompt)
            param = "prompt"
            bad = next((t for t in ids if not 0 <= t < self._vocab_size), None)
            if bad is not None:
                raise invalid_request(
                    f"token id {bad} is out of range (vocabulary size {self._vocab_size})", param=param
                )
        if not ids:
            raise invalid_request("the prompt is empty after tokenization", param=param)
        if len(ids) >= self.max_model_len:
            raise invalid_request(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(ids)} tokens, leaving no room for output. Please shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def _known_ids(self, text: str) -> list[int] | None:
        return self.answers.ids_of(self.model_name, text)

    def _sampling(self, body: CompletionRequest | ChatCompletionRequest, num_prompt: int) -> SamplingParams:
        room = self.max_model_len - num_prompt
        if isinstance(body, ChatCompletionRequest):
            requested, param = body.requested_max_tokens
            default = self._settings.default_max_tokens
        else:
            requested, param = body.max_tokens, "max_tokens"
            default = COMPLETIONS_DEFAULT_MAX_TOKENS
        if requested is None:
            max_tokens = min(default, room)
        elif requested > room:
            raise invalid_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} for the "
                f"completion). Please reduce the prompt or {param}.",
                param=param,
                code="context_length_exceeded",
            )
        else:
            max_tokens = requested
        seed = secrets.randbits(SEED_BITS) if body.seed is None else body.seed & ((1 << SEED_BITS) - 1)
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=seed,
            max_tokens=max_tokens,
            stop_token_ids=list(self._tokenizer.eos_token_ids),
        )

    async def _start(self, call: _Call, sampling: SamplingParams, stop: list[str]) -> None:
        """Subscribes to the request's stream, then has the conductor place it; `APIError` if refused."""
        try:
            stream = await self._bus.open_stream(call.request_id)
        except Exception as exc:  # noqa: BLE001 (any bus failure means the same to the client)
            log.warning("cannot subscribe to the token stream: %s", exc)
            raise APIError.from_info(errors.bus_unavailable(type(exc).__name__)) from None
        call.generation = Generation(
            call.request_id,
            stream,
            self._bus,
            Detokenizer(self._tokenizer.decode, stop=stop, context_ids=call.prompt_ids),
            max_tokens=sampling.max_tokens,
            timeout_s=self._settings.stream_timeout_s,
            arrival=call.arrival,
        )
        metrics.PROMPT_TOKENS.inc(len(call.prompt_ids))
        request = GenerateRequest(
            request_id=call.request_id,
            model=call.model,
            prompt_token_ids=call.prompt_ids,
            sampling=sampling,
            arrival_time=time.time() - (time.monotonic() - call.arrival),
        )
        reply = await self._bus.submit(request)
        if not reply.is_accepted:
            # NOTE: a conductor that fell silent may have handed the request on before dying: only a refusal it
            # did answer means nobody works on it; otherwise the close below cancels it everywhere.
            if not (reply.error and reply.error.code == "no_conductor"):
                call.generation.mark_rejected()
            info = reply.error or ErrorInfo(
                message="the request was refused", type=errors.SERVICE_UNAVAILABLE, http_status=503
            )
            raise APIError.from_info(info)
        call.generation.watch_workers(reply.prefill_id, reply.decode_id)
        log.debug("placed on prefill %s, decode %s", reply.prefill_id, reply.decode_id)

    # ---- output --------------------------------------------------------------------------------------------

    async def _collect(self, call: _Call, request: Request) -> Response:
        """The whole answer of a non-streaming request; cancels the request if the client leaves first."""
        gen = call.generation
        assert gen is not None

        async def consume() -> str:
            return "".join([piece async for piece in gen.deltas()])

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (consumer, watcher):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        if consumer.cancelled():
            call.status = CLIENT_CLOSED
            await gen.close("client_disconnected")
            return Response(status_code=CLIENT_CLOSED)
        try:
            text = consumer.result()
        except GenerationError as exc:
            raise APIError.from_info(exc.info) from None
        call.status = 200
        await self._remember_answer(call)
        build = protocol.chat_completion if call.is_chat else protocol.completion
        return JSONResponse(
            build(call.response_id, call.created, call.model, text, gen.finish_reason, call.usage())
        )

    async def _events(self, call: _Call) -> AsyncIterator[bytes]:
        """The server-sent events of a streaming request, ending with `data: [DONE]`."""
        gen = call.generation
        assert gen is not None
        with_usage = call.include_usage
        rid, created, model = call.response_id, call.created, call.model

        def chunk(text: str, finish_reason: str | None) -> bytes:
            if call.is_chat:
                delta = {"content": text} if text or finish_reason is None else {}
                return protocol.sse(
                    protocol.chat_chunk(rid, created, model, delta, finish_reason, with_usage)
                )
            return protocol.sse(
                protocol.completion_chunk(rid, created, model, text, finish_reason, with_usage)
            )

        if call.is_chat:
            first = {"role": "assistant", "content": ""}
            yield protocol.sse(protocol.chat_chunk(rid, created, model, first, None, with_usage))
        try:
            async for piece in gen.deltas():
                yield chunk(piece, None)
        except GenerationError as exc:
            call.status = exc.info.http_status
            yield protocol.sse(APIError.from_info(exc.info).envelope())
            yield protocol.SSE_DONE
            return
        except Exception:
            # NOTE: the headers are out; end the stream with an error event rather than a cut connection.
            log.exception("streaming failed")
            call.status = 500
            yield protocol.sse(APIError(500, "internal server error", code="internal_error").envelope())
            yield protocol.SSE_DONE
            return
        call.status = 200
        # NOTE: before the last event: a client may send its next turn as soon as it has the answer.
        await self._remember_answer(call)
        yield chunk("", gen.finish_reason)
        if with_usage:
            obj = "chat.completion.chunk" if call.is_chat else "text_completion"
            yield protocol.sse(protocol.usage_chunk(rid, created, model, obj, call.usage()))
        yield protocol.SSE_DONE

    async def _remember_answer(self, call: _Call) -> None:
        """Remembers the token ids of a chat answer that ended normally, when they are exactly known."""
        gen = call.generation
        if not (call.is_chat and self.answers.is_enabled and gen and gen.finish_reason in ("stop", "length")):
            return
        try:
            ids = await run_in_threadpool(
                answer_ids,
                gen.output_ids,
                gen.text,
                decode=self._tokenizer.decode,
                eos_token_ids=self._tokenizer.eos_token_ids,
                is_cut=gen.is_cut_by_stop_string,
            )
            if ids is not None:
                self.answers.remember(call.model, gen.text, ids)
        except Exception:  # NOTE: remembering is best effort; the answer is served either way.
            log.warning("remembering the answer's token ids failed", exc_info=True)

    async def _finish(self, call: _Call, request: Request) -> None:
        """Every request ends here exactly once: stream closed, workers told, counters updated."""
        if call.is_finished:
            return
        call.is_finished = True
        self._active.discard(call.request_id)
        metrics.IN_FLIGHT.dec()
        gen = call.generation
        if call.status is None:
            call.status = CLIENT_CLOSED if gen is not None else 500
        reason = "client_disconnected" if call.status == CLIENT_CLOSED else "error"
        if gen is not None:
            await gen.close(reason)
        request.state.outcome_status = call.status
        metrics.REQUEST_DURATION.labels(endpoint=call.endpoint).observe(time.monotonic() - call.arrival)
        if gen is not None and gen.finish_reason is not None:
            log.info(
                "finished: %d prompt tokens (%d cached), %d output tokens, finish_reason=%s, %.3fs",
                len(call.prompt_ids),
                gen.cached_tokens,
                gen.completion_tokens,
                gen.finish_reason,
                time.monotonic() - call.arrival,
            )


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
    except Exception:
        log.warning("cannot watch the connection; the request runs to its end", exc_info=True)
    await asyncio.Event().wait()
