"""Shared by the gateway's end-to-end tests: a fake conductor+workers on real NATS, and the gateway, client
and connection fixtures.

The fake worker answers every submit and plays the prompt's scenario on the stream subject:
  "echo:<text>"  <text> as byte tokens, index 0 published after index 1 (prefill is slower than decode),
                 then EOS (finish "stop"), or finish "length" at max_tokens;
  "fail"         one token, then an error event;
  "endless"      a token every few ms until a CancelRequest for the request arrives;
  "silent"       accepted, then nothing;
  "busy"         refused with 503 no_capacity.
"""

from __future__ import annotations

import asyncio
import re
import time

import nats
import openai
import pytest
from tsukimi.common import subjects
from tsukimi.common.messages import (
    CancelRequest,
    ErrorInfo,
    GenerateRequest,
    SubmitReply,
    TokenEvent,
    decode,
    encode,
)
from tsukimi.common.settings import Settings
from tsukimi.gateway.service import GatewayService
from tsukimi.text.tokenizer import TextTokenizer

EOS = 256
CACHED = 3


class FakeWorkers:
    """Conductor + prefill + decode in one: see the module doc."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.tokenizer = TextTokenizer.load("demo")
        self.cancels: list[CancelRequest] = []
        self.requests: list[GenerateRequest] = []
        self._cancelled: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> FakeWorkers:
        self._subs = [
            await self.nc.subscribe(subjects.SUBMIT, queue=subjects.CONDUCTOR_QUEUE, cb=self._on_submit),
            await self.nc.subscribe(subjects.CANCEL, cb=self._on_cancel),
        ]
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:
            await sub.unsubscribe()

    async def _on_cancel(self, msg) -> None:
        cancel = decode(msg.data, CancelRequest)
        self.cancels.append(cancel)
        self._cancelled.setdefault(cancel.request_id, asyncio.Event()).set()

    async def _on_submit(self, msg) -> None:
        request = decode(msg.data, GenerateRequest)
        self.requests.append(request)
        prompt = self.tokenizer.decode(request.prompt_token_ids)
        if "busy" in prompt:
            error = ErrorInfo(
                message="no decode capacity", type="service_unavailable", code="no_capacity", http_status=503
            )
            await msg.respond(encode(SubmitReply(is_accepted=False, error=error)))
            return
        await msg.respond(encode(SubmitReply(is_accepted=True, prefill_id="fake-p", decode_id="fake-d")))
        task = asyncio.create_task(self._play(request, prompt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, event: TokenEvent) -> None:
        await self.nc.publish(subjects.stream(event.request_id), encode(event))

    async def _play(self, request: GenerateRequest, prompt: str) -> None:
        rid = request.request_id
        if "silent" in prompt:
            return
        if "fail" in prompt:
            await self._publish(
                TokenEvent(request_id=rid, index=0, token_id=ord("x"), num_cached_tokens=CACHED)
            )
            error = ErrorInfo(message="decode worker crashed", code="worker_failed", http_status=502)
            await self._publish(TokenEvent(request_id=rid, index=1, error=error))
            return
        if "endless" in prompt:
            cancelled = self._cancelled.setdefault(rid, asyncio.Event())
            index = 0
            while not cancelled.is_set() and index < 5000:
                await self._publish(TokenEvent(request_id=rid, index=index, token_id=ord("a") + index % 26))
                index += 1
                await asyncio.sleep(0.005)
            return
        match = re.search(r"echo:([^\n]*)", prompt)
        text = match.group(1) if match else "hello"
        ids = [*text.encode(), EOS][: request.sampling.max_tokens]
        finish = "stop" if ids[-1] == EOS else "length"
        events = [TokenEvent(request_id=rid, index=i, token_id=t) for i, t in enumerate(ids)]
        events[0].num_cached_tokens = CACHED
        events[-1].finish_reason = finish
        # Decode overtakes prefill: index 1 goes out before index 0.
        order = [events[1], events[0], *events[2:]] if len(events) > 1 else events
        for event in order:
            await self._publish(event)

    async def wait_for_cancel(self, request_id: str | None = None, timeout_s: float = 5.0) -> CancelRequest:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for cancel in self.cancels:
                # The bus key is the client's id plus a per-request suffix.
                if request_id is None or cancel.request_id.startswith(f"{request_id}-"):
                    return cancel
            await asyncio.sleep(0.01)
        raise AssertionError(f"no CancelRequest for {request_id}")


@pytest.fixture
async def nc(nats_url):
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


@pytest.fixture
async def workers(nc):
    workers = await FakeWorkers(nc).start()
    yield workers
    await workers.stop()


@pytest.fixture
async def gateway(nats_url):
    settings = Settings(nats_url=nats_url, gateway_port=0, stream_timeout_s=5.0, instance_ttl_s=2.0)
    service = GatewayService(settings)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
def client(gateway):
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=10)
