"""The gateway end to end over real NATS and a real uvicorn server, with a fake conductor+workers in the test
(`gateway_fakes.py`), when things go wrong: worker errors, refusals, no conductor or a silent one, clients
that disconnect and streams that time out, and the cancels those send."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from tsukimi.common import subjects
from tsukimi.common.messages import CancelRequest, GenerateRequest, decode
from tsukimi.common.settings import Settings
from tsukimi.gateway.service import GatewayService

from .gateway_fakes import client, gateway, nc, workers  # noqa: F401


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
