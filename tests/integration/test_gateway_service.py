"""The gateway end to end over real NATS and a real uvicorn server, with a fake conductor+workers in the test
(`gateway_fakes.py`): completions and chats, plain and streamed, stop strings, health following heartbeats,
models, metrics and request ids, and concurrent requests kept apart."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
from tsukimi.common import subjects
from tsukimi.common.messages import DecodeStatus, Heartbeat, PrefillStatus, encode

from .gateway_fakes import CACHED, client, gateway, nc, workers  # noqa: F401


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
