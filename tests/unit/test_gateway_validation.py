"""Gateway request validation: each bad input gets the right status and an OpenAI error envelope, never a 500.

The app runs in-process (httpx ASGITransport) over a real `GatewayBus` connected to the test NATS server with
no conductor or workers behind it, so a valid request ends in 503 `no_conductor`.
"""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from tsukimi.common.settings import Settings
from tsukimi.gateway.app import create_app
from tsukimi.gateway.middleware import REQUEST_ID_PATTERN
from tsukimi.gateway.service import GatewayBus
from tsukimi.text.chat_template import ChatTemplate
from tsukimi.text.tokenizer import TextTokenizer

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return dataclasses.replace(TextTokenizer.load("demo"), max_model_len=MAX_MODEL_LEN)


@pytest.fixture
async def bus(nats_url):
    settings = Settings(nats_url=nats_url)
    bus = await GatewayBus.connect(settings)
    yield bus
    await bus.close()


def make_client(settings: Settings, bus, tokenizer) -> httpx.AsyncClient:
    app = create_app(settings, bus, tokenizer)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.fixture
async def client(nats_url, bus, tokenizer):
    async with make_client(Settings(nats_url=nats_url, submit_timeout_s=1.0), bus, tokenizer) as client:
        yield client


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if 400 <= status < 500 and status != 429:
        assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert REQUEST_ID_PATTERN.match(response.headers["x-request-id"])
    return error


COMPLETION = {"model": "demo", "prompt": "hi"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def test_malformed_json(client):
    response = await client.post(
        "/v1/completions",
        content=b'{"model": "demo", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, code="invalid_json")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"null", b""])
async def test_body_not_an_object(client, body):
    response = await client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, 400)


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"model": None}, "model"),
        ({"prompt": None}, "prompt"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"n": 2}, "n"),
        ({"n": 0}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True}, "echo"),
        ({"logprobs": 1}, "logprobs"),
        ({"suffix": "x"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [[1, 2], [3]]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": {"text": "hi"}}, "prompt"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
async def test_completion_bad_parameter(client, patch, param):
    body = {**COMPLETION, **patch}
    body = {k: v for k, v in body.items() if not (v is None and k in ("model", "prompt"))}
    response = await client.post("/v1/completions", json=body)
    assert_error(response, 400, param=param)


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 3}, "n"),
    ],
)
async def test_chat_bad_parameter(client, patch, param):
    response = await client.post("/v1/chat/completions", json={**CHAT, **patch})
    assert_error(response, 400, param=param)


async def test_unknown_model(client):
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        response = await client.post(path, json={**body, "model": "gpt-4"})
        assert_error(response, 404, param="model", code="model_not_found")
    assert_error(await client.get("/v1/models/gpt-4"), 404, param="model", code="model_not_found")


async def test_token_id_out_of_range(client):
    response = await client.post("/v1/completions", json={**COMPLETION, "prompt": [1, 2, 100000]})
    assert_error(response, 400, param="prompt")


async def test_prompt_fills_the_context(client):
    response = await client.post("/v1/completions", json={**COMPLETION, "prompt": "x" * MAX_MODEL_LEN})
    assert_error(response, 400, param="prompt", code="context_length_exceeded")
    messages = [{"role": "user", "content": "x" * MAX_MODEL_LEN}]
    response = await client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert_error(response, 400, param="messages", code="context_length_exceeded")


async def test_prompt_plus_max_tokens_exceeds_the_context(client):
    response = await client.post(
        "/v1/completions", json={**COMPLETION, "prompt": "x" * 40, "max_tokens": 100}
    )
    assert_error(response, 400, param="max_tokens", code="context_length_exceeded")
    response = await client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 120})
    assert_error(response, 400, param="max_completion_tokens", code="context_length_exceeded")


async def test_chat_template_error_is_a_400(nats_url, bus, tokenizer):
    broken = dataclasses.replace(
        tokenizer, chat_template=ChatTemplate("{{ raise_exception('no system role') }}")
    )
    async with make_client(Settings(nats_url=nats_url), bus, broken) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert_error(response, 400, param="messages")


async def test_valid_request_without_conductor_is_503(client):
    # Unknown and default-valued OpenAI parameters are accepted and ignored.
    extras = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logprobs": None,
        "best_of": 1,
        "echo": False,
        "n": 1,
        "user": "u1",
        "some_future_param": {"x": 1},
        "stop": "\n",
    }
    response = await client.post("/v1/completions", json={**COMPLETION, **extras})
    assert_error(response, 503, code="no_conductor")
    assert response.json()["error"]["type"] == "service_unavailable"
    chat = {
        **CHAT,
        "messages": [
            {"role": "system", "content": "be terse"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": None},
            {"role": "developer", "content": "x"},
        ],
        "logprobs": False,
        "tool_choice": "none",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await client.post("/v1/chat/completions", json=chat)
    assert_error(response, 503, code="no_conductor")


async def test_request_id_header(client):
    response = await client.post(
        "/v1/completions", json={**COMPLETION, "n": 2}, headers={"X-Request-Id": "my-id_1"}
    )
    assert response.headers["x-request-id"] == "my-id_1"
    for bad in ("a.b", "has space", "x" * 65, "a>b"):
        response = await client.get("/v1/models", headers={"X-Request-Id": bad})
        rid = response.headers["x-request-id"]
        assert rid != bad and REQUEST_ID_PATTERN.match(rid)


async def test_unknown_route_and_method(client):
    assert_error(await client.get("/v1/nothing"), 404, code="not_found")
    assert_error(await client.get("/v1/completions"), 405)


async def test_models_and_health_without_workers(client):
    response = await client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["demo"]
    assert body["data"][0]["object"] == "model"
    # What a load generator needs to draw prompt ids: the demo's bytes, not its end-of-text token.
    assert (body["data"][0]["vocab_size"], body["data"][0]["special_token_ids"]) == (257, [256])
    response = await client.get("/health")
    assert response.status_code == 503
    assert set(response.json()["missing"]) == {"prefill", "decode"}


async def test_validation_errors_are_not_echoed_as_500_for_odd_json(client):
    for raw in (
        b'{"model": "demo", "prompt": "hi", "temperature": NaN}',
        b'{"model": "demo", "prompt": "\\ud800"}',
    ):
        response = await client.post(
            "/v1/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code in (400, 503), response.text
        json.loads(response.text)


async def test_json_is_accepted_whatever_the_content_type(client):
    raw = json.dumps(COMPLETION).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        response = await client.post("/v1/completions", content=raw, headers={"content-type": content_type})
        assert_error(response, 503, code="no_conductor")


async def test_pathological_bodies(client):
    deep = b'{"model": "demo", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = await client.post("/v1/completions", content=deep)
    assert_error(response, 400)
    huge = b'{"model": "demo", "prompt": "' + b"x" * (17 << 20) + b'"}'
    response = await client.post("/v1/completions", content=huge)
    assert_error(response, 413, code="body_too_large")
    response = await client.post("/v1/completions", content=b"\xff\xfe\x00garbage")
    assert_error(response, 400, code="invalid_json")
