"""`tsukimi bench generate`'s client side: what it reads from a streamed completion, and its summary."""

from __future__ import annotations

import json

import httpx

from tsukimi.bench.vs_generate import CaseResult, Timing, _serve_one


def _sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def test_a_streamed_completion_is_read_whole_across_split_chunks():
    body = _sse({"choices": [{"text": "Hello\u2028wor"}]}, {"choices": [{"text": "ld \U0001F391"}]},
                {"choices": [{"text": "", "finish_reason": "stop"}]},
                {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    seen = {}

    async def chunks():
        for i in range(0, len(body), 7):  # lines and UTF-8 characters cut across chunks
            yield body[i:i + 7]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(200, content=chunks(), headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        timing = await _serve_one(client, "http://server", "m", [1, 2, 3], 8)
    assert (timing.text, timing.num_tokens, timing.error) == ("Hello\u2028world \U0001F391", 4, "")
    assert seen["prompt"] == [1, 2, 3] and seen["max_tokens"] == 8 and seen["temperature"] == 0
    assert 0 < timing.ttft_s and timing.tbt_s >= 0


async def test_a_refused_request_is_reported_not_raised():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"error": {"message": "overloaded"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        timing = await _serve_one(client, "http://server", "m", [1], 8)
    assert timing.error.startswith("HTTP 429") and timing.num_tokens == 0


def test_summary_compares_the_sides_on_the_same_requests():
    result = CaseResult("2 concurrent", 2, 40, server=[Timing("a", 0.2, 0.05, 10), Timing("b", 0.4, 0.07, 30)],
                        server_wall_s=2.0, generate=[Timing("a", 0.1, 0.04, 10), Timing("c", 0.1, 0.04, 30)],
                        generate_wall_s=4.0, batched_wall_s=1.0, batched_tokens=35, num_equal=1)
    summary = result.summary()
    assert summary["server_tokens_per_s"] == 20.0 and summary["generate_sequential_tokens_per_s"] == 10.0
    assert summary["generate_batched_tokens_per_s"] == 35.0 and summary["equal_outputs"] == "1/2"
    assert summary["server_ttft_ms"] == 300.0 and summary["server_tbt_ms"] == 60.0
