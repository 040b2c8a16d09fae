"""Gateway app logic over an in-memory bus: admission (429, duplicate ids), refusals, timeouts, internal
errors, event ordering."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from tsukimi.common.messages import ErrorInfo, GenerateRequest, SubmitReply, TokenEvent
from tsukimi.common.settings import Settings
from tsukimi.gateway.app import create_app
from tsukimi.gateway.stream import EventOrderer
from tsukimi.text.tokenizer import TextTokenizer

EOS = 256


class FakeStream:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.orderer = EventOrderer()
        self.is_closed = False

    def publish(self, event: TokenEvent) -> None:
        for ready in self.orderer.push(event):
            self.queue.put_nowait(ready)

    async def next_event(self, timeout_s: float) -> TokenEvent:
        return await asyncio.wait_for(self.queue.get(), timeout_s)

    async def close(self) -> None:
        self.is_closed = True


class FakeBus:
    """Accepts every request (or does what `on_submit` says) and lets the test publish its events."""

    def __init__(self, on_submit=None) -> None:
        self.on_submit = on_submit
        self.streams: dict[str, FakeStream] = {}
        self.requests: dict[str, GenerateRequest] = {}
        self.cancels: list[tuple[str, str]] = []
        # Instances the test declares dead.
        self.lost: set[str] = set()

    async def submit(self, request: GenerateRequest) -> SubmitReply:
        self.requests[request.request_id] = request
        if self.on_submit is not None:
            return self.on_submit(request, self.streams[request.request_id])
        return SubmitReply(is_accepted=True, prefill_id="p", decode_id="d")

    async def open_stream(self, request_id: str) -> FakeStream:
        self.streams[request_id] = FakeStream()
        return self.streams[request_id]

    async def cancel(self, request_id: str, reason: str) -> None:
        self.cancels.append((request_id, reason))

    def is_ready(self) -> tuple[bool, dict]:
        return True, {}

    def is_lost(self, instance_id: str) -> bool:
        return instance_id in self.lost

    async def wait_for_request(self) -> str:
        """Id of the next request that reaches the bus (each is returned once)."""
        seen = self.__dict__.setdefault("_seen", set())
        for _ in range(500):
            fresh = [rid for rid in self.requests if rid not in seen]
            if fresh:
                seen.add(fresh[0])
                return fresh[0]
            await asyncio.sleep(0.01)
        raise AssertionError("no request reached the bus")


def echo(text: str):
    """on_submit answering with `text` (byte tokens), index 0 last, then EOS."""

    def on_submit(request: GenerateRequest, stream: FakeStream) -> SubmitReply:
        ids = [*text.encode(), EOS]
        events = [TokenEvent(request_id=request.request_id, index=i, token_id=t) for i, t in enumerate(ids)]
        events[-1].finish_reason = "stop"
        events[0].num_cached_tokens = 2
        for event in [*events[1:], events[0]]:
            stream.publish(event)
        return SubmitReply(is_accepted=True)

    return on_submit


def client_for(bus, **settings) -> httpx.AsyncClient:
    app = create_app(Settings(**settings), bus, TextTokenizer.load("demo"))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


BODY = {"model": "demo", "prompt": "hi", "max_tokens": 20}


def test_event_orderer_reorders_and_drops_duplicates():
    orderer = EventOrderer()
    ev = lambda i, **kw: TokenEvent(request_id="r", index=i, token_id=i, **kw)
    assert orderer.push(ev(1)) == []
    assert orderer.push(ev(2)) == []
    assert [e.index for e in orderer.push(ev(0))] == [0, 1, 2]
    assert orderer.push(ev(1)) == []
    error = TokenEvent(request_id="r", index=9, error=ErrorInfo(message="boom"))
    assert orderer.push(error) == [error]


async def test_reordered_events_make_the_right_text_and_usage():
    bus = FakeBus(echo("héllo"))
    async with client_for(bus) as client:
        response = await client.post("/v1/completions", json=BODY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"] == "héllo"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 7,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    rid = response.headers["x-request-id"]
    assert body["id"] == f"cmpl-{rid}"
    request = bus.requests[rid]
    assert request.sampling.max_tokens == 20 and request.sampling.stop_token_ids == [EOS]
    assert 0 <= request.sampling.seed < 2**63
    assert bus.streams[rid].is_closed and bus.cancels == []


async def test_sampling_defaults_and_seed():
    bus = FakeBus(echo("x"))
    async with client_for(bus, default_max_tokens=33) as client:
        await client.post(
            "/v1/completions", json={"model": "demo", "prompt": "hi", "seed": 7, "temperature": 0}
        )
        await client.post(
            "/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "a"}]}
        )
    completion, chat = bus.requests.values()
    assert completion.sampling.max_tokens == 16 and completion.sampling.seed == 7
    assert completion.sampling.temperature == 0 and completion.sampling.top_p == 1.0
    assert chat.sampling.max_tokens == 33 and chat.sampling.temperature == 1.0


async def test_stop_string_cancels_the_workers():
    bus = FakeBus(echo("one. two"))
    async with client_for(bus) as client:
        response = await client.post("/v1/completions", json={**BODY, "stop": ". "})
    assert response.json()["choices"][0]["text"] == "one"
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    assert bus.cancels == [(response.headers["x-request-id"], "stop_string")]


async def test_too_many_in_flight_is_429_and_a_reused_id_is_a_new_request():
    bus = FakeBus()
    async with client_for(bus, max_inflight_requests=1) as client:
        first = asyncio.create_task(
            client.post("/v1/completions", json=BODY, headers={"X-Request-Id": "first"})
        )
        rid = await bus.wait_for_request()
        response = await client.post("/v1/completions", json=BODY)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        bus.streams[rid].publish(TokenEvent(request_id=rid, index=0, token_id=65, finish_reason="length"))
        assert (await first).json()["choices"][0]["text"] == "A"
        assert (await first).json()["choices"][0]["finish_reason"] == "length"

    # A client reusing its request id (a retry) gets a distinct request inside: the id is echoed back,
    # the bus key differs, so the two never share a stream or a worker's cancellation memory.
    bus = FakeBus()
    async with client_for(bus) as client:
        first = asyncio.create_task(
            client.post("/v1/completions", json=BODY, headers={"X-Request-Id": "same"})
        )
        rid_first = await bus.wait_for_request()
        second = asyncio.create_task(
            client.post("/v1/completions", json=BODY, headers={"X-Request-Id": "same"})
        )
        rid_second = await bus.wait_for_request()
        assert rid_first != rid_second
        assert rid_first.startswith("same-") and rid_second.startswith("same-")
        for rid in (rid_first, rid_second):
            bus.streams[rid].publish(TokenEvent(request_id=rid, index=0, token_id=65, finish_reason="stop"))
        for task in (first, second):
            response = await task
            assert response.status_code == 200 and response.headers["x-request-id"] == "same"


async def test_lost_decode_worker_fails_the_request_early_and_cancels_it():
    bus = FakeBus()
    async with client_for(bus, stream_timeout_s=60) as client:
        started = time.monotonic()
        pending = asyncio.create_task(client.post("/v1/completions", json=BODY))
        rid = await bus.wait_for_request()
        bus.streams[rid].publish(TokenEvent(request_id=rid, index=0, token_id=65))
        bus.lost.add("d")
        response = await pending
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "worker_lost"
    assert time.monotonic() - started < 5  # not the 60 s stream timeout
    assert (rid, "worker_lost") in bus.cancels


async def test_refused_request_answers_with_the_conductors_error():
    info = ErrorInfo(
        message="all decode workers are full", type="service_unavailable", code="no_capacity", http_status=503
    )
    bus = FakeBus(lambda request, stream: SubmitReply(is_accepted=False, error=info))
    async with client_for(bus) as client:
        response = await client.post("/v1/completions", json=BODY)
    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "all decode workers are full",
        "type": "service_unavailable",
        "param": None,
        "code": "no_capacity",
    }
    assert bus.cancels == []

    info = ErrorInfo(message="slow down", type="rate_limit_error", code="queue_full", http_status=429)
    bus = FakeBus(lambda request, stream: SubmitReply(is_accepted=False, error=info))
    async with client_for(bus) as client:
        assert (await client.post("/v1/completions", json=BODY)).status_code == 429


async def test_worker_error_event_fails_the_request():
    def on_submit(request, stream):
        stream.publish(TokenEvent(request_id=request.request_id, index=0, token_id=65))
        error = ErrorInfo(message="decode worker died", code="worker_lost", http_status=502)
        stream.publish(TokenEvent(request_id=request.request_id, index=1, error=error))
        return SubmitReply(is_accepted=True)

    bus = FakeBus(on_submit)
    async with client_for(bus) as client:
        response = await client.post("/v1/completions", json=BODY)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "worker_lost"
    assert [reason for _, reason in bus.cancels] == ["error"]


async def test_silent_stream_times_out_with_504_and_a_cancel():
    bus = FakeBus()
    async with client_for(bus, stream_timeout_s=0.2) as client:
        response = await client.post("/v1/completions", json=BODY)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "stream_timeout"
    assert bus.cancels == [(response.headers["x-request-id"], "timeout")]


async def test_internal_failure_is_a_500_envelope():
    def on_submit(request, stream):
        raise RuntimeError("bug")

    bus = FakeBus(on_submit)
    async with client_for(bus) as client:
        response = await client.post("/v1/completions", json=BODY)
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert response.headers["x-request-id"]
        assert bus.cancels == [(response.headers["x-request-id"], "error")]
        # The request's slot was released.
        bus.on_submit = echo("ok")
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200


async def test_health_reflects_the_bus():
    bus = FakeBus()
    async with client_for(bus) as client:
        response = await client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_response_shape(stream):
    bus = FakeBus(echo("hey"))
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with client_for(bus) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    if not stream:
        data = response.json()
        assert data["object"] == "chat.completion"
        assert data["choices"][0]["message"] == {"role": "assistant", "content": "hey"}
        return
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "hey"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
