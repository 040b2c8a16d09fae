"""The gateway end to end over real NATS and a real uvicorn server, with a fake conductor+workers in the test.

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
import json
import re
import time

import httpx
import nats
import openai
import pytest
from tsukimi.common import subjects
from tsukimi.common.messages import (
    CancelRequest,
    DecodeStatus,
    ErrorInfo,
    GenerateRequest,
    Heartbeat,
    PrefillStatus,
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


async def test_completion(client, workers):
    response = await client.completions.create(model="demo", prompt="echo:Hello, wörld!", max_tokens=50)
    assert response.object == "text_completion"
    assert response.id.startswith("cmpl-")
    assert response.choices[0].text == "Hello, wörld!"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens == len("echo:Hello, wörld!".encode())
    assert response.usage.completion_tokens == len("Hello, wörld!".encode()) + 1
    assert response.usage.prompt_tokens_details.cached_tokens == CACHED
    assert workers.cancels == []


async def test_completion_length_and_token_prompt(client, workers):
    prompt = list(b"echo:abcdefgh")
    response = await client.completions.create(
        model="demo", prompt=prompt, max_tokens=3, temperature=0, seed=1
    )
    assert response.choices[0].text == "abc"
    assert response.choices[0].finish_reason == "length"
    assert workers.requests[-1].prompt_token_ids == prompt
    assert workers.requests[-1].sampling.seed == 1


async def test_completion_stream_with_usage(client, workers):
    stream = await client.completions.create(
        model="demo",
        prompt="echo:streamed 日本",
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "streamed 日本"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len("streamed 日本".encode()) + 1
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == CACHED


async def test_chat(client, workers):
    response = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "system", "content": "be terse"}, {"role": "user", "content": "echo:Hi there"}],
        max_completion_tokens=30,
    )
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == "Hi there"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert workers.requests[-1].sampling.max_tokens == 30


async def test_chat_stream(client, workers):
    stream = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "echo:chunky"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "chunky"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens > 0 and chunks[-1].choices == []
    assert all(c.object == "chat.completion.chunk" for c in chunks)


async def test_stop_strings(client, workers):
    response = await client.completions.create(
        model="demo", prompt="echo:one, two; three", max_tokens=50, stop=[";", "xx"]
    )
    assert response.choices[0].text == "one, two"
    assert response.choices[0].finish_reason == "stop"
    cancel = await workers.wait_for_cancel()
    assert cancel.reason == "stop_string"

    stream = await client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "echo:alpha STOP beta"}], stop="STOP", stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "alpha "
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_worker_error(client, workers):
    with pytest.raises(openai.APIStatusError) as info:
        await client.completions.create(model="demo", prompt="fail", max_tokens=10)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "worker_failed"

    stream = await client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "fail"}], stream=True
    )
    with pytest.raises(openai.APIError, match="decode worker crashed"):
        async for _ in stream:
            pass


async def test_refused_request(client, workers):
    with pytest.raises(openai.APIStatusError) as info:
        await client.completions.create(model="demo", prompt="busy", max_tokens=10)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "no_capacity"


async def test_no_conductor(client):
    with pytest.raises(openai.APIStatusError) as info:
        await client.completions.create(model="demo", prompt="hi", max_tokens=10)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "no_conductor"
    assert info.value.body["type"] == "service_unavailable"


async def test_stream_client_disconnect_cancels(gateway, workers):
    body = {"model": "demo", "prompt": "endless", "max_tokens": 4000, "stream": True}
    async with (
        httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
        http.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "disc-1"}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "disc-1"
        received = 0
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                received += 1
                if received == 3:
                    break
    cancel = await workers.wait_for_cancel("disc-1")
    assert cancel.reason == "client_disconnected"


async def test_non_stream_client_disconnect_cancels(gateway, workers):
    body = {"model": "demo", "prompt": "endless", "max_tokens": 4000}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=body, headers={"X-Request-Id": "disc-2"})
    cancel = await workers.wait_for_cancel("disc-2")
    assert cancel.reason == "client_disconnected"


async def test_stream_timeout(nats_url, workers):
    settings = Settings(nats_url=nats_url, gateway_port=0, stream_timeout_s=0.3)
    service = GatewayService(settings)
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
            response = await http.post(
                "/v1/completions",
                json={"model": "demo", "prompt": "silent"},
                headers={"X-Request-Id": "slow-1"},
            )
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "stream_timeout"
            body = {"model": "demo", "prompt": "silent", "stream": True}
            response = await http.post("/v1/completions", json=body, headers={"X-Request-Id": "slow-2"})
            assert response.status_code == 200
            events = [e for e in response.text.split("\n\n") if e]
            assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == "stream_timeout"
            assert events[-1] == "data: [DONE]"
        assert (await workers.wait_for_cancel("slow-1")).reason == "timeout"
        assert (await workers.wait_for_cancel("slow-2")).reason == "timeout"
    finally:
        await service.stop()


async def test_health_follows_heartbeats(gateway, nc):
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
        response = await http.get("/health")
        assert response.status_code == 503
        assert set(response.json()["missing"]) == {"prefill", "decode"}

        for kind in ("prefill", "decode"):
            status = PrefillStatus() if kind == "prefill" else DecodeStatus()
            beat = Heartbeat(instance_id=f"hc-{kind}", status=status, model="demo", sent_at=time.time())
            await nc.publish(subjects.heartbeat(kind, beat.instance_id), encode(beat))
        await nc.flush()
        for _ in range(100):
            response = await http.get("/health")
            if response.status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ok"

        leaving = Heartbeat(instance_id="hc-decode", status=DecodeStatus(), is_leaving=True)
        await nc.publish(subjects.heartbeat("decode", "hc-decode"), encode(leaving))
        await nc.flush()
        for _ in range(100):
            response = await http.get("/health")
            if response.status_code == 503:
                break
            await asyncio.sleep(0.02)
        assert response.status_code == 503
        assert response.json()["missing"] == ["decode"]


async def test_models_metrics_and_request_id(gateway, client, workers):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["demo"]

    raw = await client.completions.with_raw_response.create(model="demo", prompt="echo:abc", max_tokens=8)
    rid = raw.headers["x-request-id"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", rid)
    assert raw.parse().id == f"cmpl-{rid}"

    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
        response = await http.post(
            "/v1/completions",
            json={"model": "demo", "prompt": "echo:x"},
            headers={"X-Request-Id": "client-id-7"},
        )
        assert response.headers["x-request-id"] == "client-id-7"
        error = await http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert error.status_code == 404 and error.headers["x-request-id"]
        metrics = (await http.get("/metrics")).text
    assert 'tsukimi_gateway_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert 'tsukimi_gateway_requests_total{endpoint="/v1/completions",status="404"}' in metrics
    assert "tsukimi_gateway_time_to_first_token_seconds_bucket" in metrics
    assert "tsukimi_gateway_inter_token_latency_seconds_count" in metrics
    assert "tsukimi_gateway_requests_in_flight 0.0" in metrics


async def test_silent_conductor_is_503(nats_url, nc):
    """A conductor that dies while placing a request: the client gets an explicit 503, and the request is
    cancelled everywhere (the conductor may have handed it to a prefill worker before dying)."""
    submitted: list[GenerateRequest] = []
    cancels: list[CancelRequest] = []

    async def ignore(msg):
        submitted.append(decode(msg.data, GenerateRequest))

    async def on_cancel(msg):
        cancels.append(decode(msg.data, CancelRequest))

    sub = await nc.subscribe(subjects.SUBMIT, queue=subjects.CONDUCTOR_QUEUE, cb=ignore)
    cancel_sub = await nc.subscribe(subjects.CANCEL, cb=on_cancel)
    await nc.flush()
    service = GatewayService(Settings(nats_url=nats_url, gateway_port=0, submit_timeout_s=0.2))
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=5) as http:
            response = await http.post("/v1/completions", json={"model": "demo", "prompt": "hi"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_conductor"
        assert response.json()["error"]["type"] == "service_unavailable"
        for _ in range(50):
            if cancels:
                break
            await asyncio.sleep(0.02)
        assert [c.request_id for c in cancels] == [submitted[0].request_id]
    finally:
        await service.stop()
        await sub.unsubscribe()
        await cancel_sub.unsubscribe()


async def test_concurrent_requests_do_not_mix(client, workers):
    async def one(i: int) -> None:
        text = f"request number {i} " + "é" * (i % 3)
        if i % 2:
            stream = await client.completions.create(
                model="demo", prompt=f"echo:{text}", max_tokens=60, stream=True
            )
            got = "".join([c.choices[0].text async for c in stream if c.choices])
        else:
            messages = [{"role": "user", "content": f"echo:{text}"}]
            response = await client.chat.completions.create(model="demo", messages=messages, max_tokens=60)
            got = response.choices[0].message.content
        assert got == text

    await asyncio.gather(*(one(i) for i in range(24)))
    assert workers.cancels == []
