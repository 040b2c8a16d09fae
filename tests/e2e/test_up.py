"""The whole system through `tsukimi up` and HTTP: real model, real processes, real NATS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import nats
import openai
import pytest

from tsukimi.common import subjects
from tsukimi.common.messages import Heartbeat, decode
from tsukimi.model.loader import build_demo_model, load_model
from tsukimi.text.tokenizer import TextTokenizer

from .checkpoints import build_qwen2_checkpoint
from .conftest import greedy_ids, start_up, stop_up

pytestmark = pytest.mark.e2e

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):\n    ",
    "Tsukimi is the Japanese festival of",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,",
    "A long prompt " * 30,
    "Mooncake separates prefill from decode because",
]


def reference_ids(model, tokenizer: TextTokenizer, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """transformers' own greedy `generate`, stopping at EOS like the server."""
    eos = tokenizer.eos_token_ids[0]
    return greedy_ids(model, prompt_ids, max_tokens, eos_token_id=eos, pad_token_id=eos)


async def complete(client: httpx.AsyncClient, model: str, prompt, max_tokens: int, **extra) -> dict:
    r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def check_identical(body: dict, ref: list[int], tokenizer: TextTokenizer) -> None:
    choice = body["choices"][0]
    assert body["usage"]["completion_tokens"] == len(ref)
    assert choice["text"] == tokenizer.decode(ref)
    assert choice["finish_reason"] == ("stop" if ref[-1] in tokenizer.eos_token_ids else "length")


@pytest.fixture(scope="module")
def demo_reference():
    return build_demo_model(), TextTokenizer.load("demo")


async def check_single_and_concurrent(base_url: str, model, tokenizer, single: str, num_single: int,
                                      lengths: list[int]) -> None:
    """`single` alone, then every prompt of PROMPTS at once (`lengths` tokens each): all token-identical to
    transformers' greedy generate."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        body = await complete(client, "demo", single, num_single)
        check_identical(body, reference_ids(model, tokenizer, tokenizer.encode(single), num_single), tokenizer)
        bodies = await asyncio.gather(*[complete(client, "demo", p, n) for p, n in zip(PROMPTS, lengths)])
    for prompt, n, body in zip(PROMPTS, lengths, bodies):
        check_identical(body, reference_ids(model, tokenizer, tokenizer.encode(prompt), n), tokenizer)


async def test_single_and_concurrent_greedy_match_transformers(demo_up, demo_reference):
    model, tokenizer = demo_reference
    await check_single_and_concurrent(demo_up.base_url, model, tokenizer, PROMPTS[1], 32,
                                      [8 + 5 * i for i in range(len(PROMPTS))])


async def test_chat_uses_the_plain_template(demo_up, demo_reference):
    model, tokenizer = demo_reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Tsukimi?"}]
    async with httpx.AsyncClient(base_url=demo_up.base_url, timeout=120) as client:
        r = await client.post("/v1/chat/completions", json={"model": "demo", "messages": messages,
                                                            "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = reference_ids(model, tokenizer, tokenizer.encode_chat(messages), 12)
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(ref)
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode_chat(messages))


async def test_seeded_sampling_reproducible_through_the_api(demo_up):
    async with httpx.AsyncClient(base_url=demo_up.base_url, timeout=120) as client:
        req = {"model": "demo", "prompt": "Roll the dice:", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9}
        a = (await client.post("/v1/completions", json={**req, "seed": 7})).json()
        b = (await client.post("/v1/completions", json={**req, "seed": 7})).json()
        c = (await client.post("/v1/completions", json={**req, "seed": 8})).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["text"] != c["choices"][0]["text"]


async def test_openai_client_streaming_and_not(demo_up, demo_reference):
    model, tokenizer = demo_reference
    client = openai.AsyncOpenAI(base_url=demo_up.base_url + "/v1", api_key="unused")
    prompt = "Stream this:"
    ref = tokenizer.decode(reference_ids(model, tokenizer, tokenizer.encode(prompt), 10))
    full = await client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0)
    assert full.choices[0].text == ref and full.usage.prompt_tokens_details.cached_tokens == 0
    chunks = [c async for c in await client.completions.create(
        model="demo", prompt=prompt, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert chunks[-1].usage.completion_tokens == 10
    chat = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, temperature=0)
    stream = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=6, temperature=0, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == chat.choices[0].message.content
    await client.close()


async def test_bad_input_gets_4xx_envelopes(demo_up):
    async with httpx.AsyncClient(base_url=demo_up.base_url, timeout=30) as client:
        cases = [
            (dict(content=b"{not json"), 400),
            (dict(json={"model": "demo"}), 400),
            (dict(json={"model": "demo", "prompt": "x", "max_tokens": -1}), 400),
            (dict(json={"model": "demo", "prompt": "x", "max_tokens": 10**9}), 400),
            (dict(json={"model": "demo", "prompt": "x", "n": 3}), 400),
            (dict(json={"model": "demo", "prompt": 5}), 400),
            (dict(json={"model": "nope", "prompt": "x"}), 404),
            (dict(json={"model": "demo", "prompt": "x" * 5000, "max_tokens": 1}), 400),
        ]
        for kwargs, status in cases:
            r = await client.post("/v1/completions", headers={"Content-Type": "application/json"}, **kwargs)
            assert r.status_code == status, (kwargs, r.text)
            error = r.json()["error"]
            assert set(error) >= {"message", "type", "param", "code"} and error["message"]
            assert r.headers["X-Request-Id"]
        # The services survived all of it.
        assert (await client.get("/health")).status_code == 200
        assert (await complete(client, "demo", "still alive?", 4))["usage"]["completion_tokens"] == 4


async def test_client_disconnect_frees_decode(demo_up):
    nc = await nats.connect(demo_up.nats_url)
    beats: dict[str, Heartbeat] = {}

    async def on_beat(msg):
        beat = decode(msg.data, Heartbeat)
        beats[beat.kind] = beat

    await nc.subscribe(subjects.HEARTBEAT_ALL, cb=on_beat)
    try:
        async with httpx.AsyncClient(base_url=demo_up.base_url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json={
                    "model": "demo", "prompt": "never ending", "max_tokens": 3000, "temperature": 0,
                    "stream": True}) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if n >= 5:
                        break
        await asyncio.sleep(1.0)
        deadline = time.monotonic() + 10
        while True:
            d = beats.get("decode")
            if d and d.status.num_running == 0 and d.status.num_waiting == 0:
                break
            assert time.monotonic() < deadline, f"decode still busy: {d}"
            await asyncio.sleep(0.2)
        freed = d.status.num_free_kv_bytes
        await asyncio.sleep(0.8)
        assert beats["decode"].status.num_free_kv_bytes == freed  # stable: nothing stranded
    finally:
        await nc.close()
    async with httpx.AsyncClient(base_url=demo_up.base_url, timeout=30) as client:
        metrics = (await client.get("/metrics")).text
    assert "tsukimi_gateway" in metrics


async def test_health_models_metrics(demo_up):
    async with httpx.AsyncClient(base_url=demo_up.base_url, timeout=30) as client:
        assert (await client.get("/health")).status_code == 200
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["demo"]
        r = await client.post("/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2},
                              headers={"X-Request-Id": "my-trace-1"})
        assert r.headers["X-Request-Id"] == "my-trace-1"
        metrics = (await client.get("/metrics")).text
    for name in ("tsukimi_gateway_requests_total", "tsukimi_gateway_time_to_first_token_seconds_bucket",
                 "tsukimi_gateway_inter_token_latency_seconds_bucket", "tsukimi_gateway_requests_in_flight"):
        assert name in metrics, name
    assert "my-trace-1" in demo_up.log()


@pytest.fixture(scope="module")
def qwen_up(tmp_path_factory):
    """A differently shaped Qwen2 checkpoint through `--model PATH`, 2 decode workers, the embedded NATS;
    stopped with SIGTERM at the end, which must exit 0 and leave no orphan."""
    directory = tmp_path_factory.mktemp("qwen2-tiny")
    build_qwen2_checkpoint(str(directory))
    deployment = start_up(tmp_path_factory, "--model", str(directory), "--decode", "2")
    yield deployment, directory
    code, orphans = stop_up(deployment, signal.SIGTERM)
    assert code == 0, deployment.log()[-3000:]
    assert orphans == []


def test_second_model_greedy_matches_transformers(qwen_up):
    deployment, directory = qwen_up
    model, tokenizer = load_model(str(directory)), TextTokenizer.load(str(directory))
    assert deployment.model == directory.name

    async def run():
        async with httpx.AsyncClient(base_url=deployment.base_url, timeout=120) as client:
            bodies = await asyncio.gather(*[complete(client, directory.name, p, 6 + 3 * i)
                                            for i, p in enumerate(PROMPTS)])
            chat = await client.post("/v1/chat/completions", json={
                "model": directory.name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
                "temperature": 0})
            return bodies, chat.json()

    bodies, chat = asyncio.run(run())
    for i, (prompt, body) in enumerate(zip(PROMPTS, bodies)):
        check_identical(body, reference_ids(model, tokenizer, tokenizer.encode(prompt), 6 + 3 * i), tokenizer)
    chat_ids = tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    assert chat_ids[:len("<|im_start|>user")] == list(b"<|im_start|>user")
    assert chat["choices"][0]["message"]["content"] == tokenizer.decode(reference_ids(model, tokenizer, chat_ids, 8))


def test_killed_decode_worker_fails_its_stream_fast_and_is_restarted(qwen_up):
    deployment, directory = qwen_up

    async def run():
        async with httpx.AsyncClient(base_url=deployment.base_url, timeout=60) as client:
            body = {"model": directory.name, "prompt": "endless", "max_tokens": 900, "temperature": 0,
                    "stream": True}
            async with client.stream("POST", "/v1/completions", json=body,
                                     headers={"X-Request-Id": "victim"}) as r:
                lines = r.aiter_lines()
                # Three tokens: the first comes from prefill, the next ones prove decode holds the request.
                num_tokens = 0
                while num_tokens < 3:
                    num_tokens += (await anext(lines)).startswith("data: {")
                placed = re.search(r"\[victim-\w+\] tsukimi.conductor: placed on prefill \S+ \(reusing \d+ blocks\), "
                                   r"decode ([^;\s]+);",
                                   deployment.log())
                pid = int(placed.group(1).rsplit("-", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                async for line in lines:
                    if '"error"' in line:
                        error = json.loads(line.removeprefix("data: "))["error"]
                        break
                else:
                    raise AssertionError("stream ended without an error")
            assert error["code"] == "worker_lost", error
            assert time.monotonic() - killed_at < 10  # instance TTL is 2 s here, not the 300 s stream timeout
            # The system keeps serving: the other decode worker, then the restarted one.
            deadline = time.monotonic() + 120
            while "decode-1 exited with -9; restarting it" not in deployment.log() and \
                    "decode-0 exited with -9; restarting it" not in deployment.log():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            # NOTE: until its heartbeat TTL (2 s here) passes, the conductor may still place on the dead worker.
            await asyncio.sleep(3)
            for _ in range(3):
                assert (await complete(client, directory.name, "after the crash", 4))["usage"][
                    "completion_tokens"] == 4

    asyncio.run(run())


async def test_the_next_turn_reuses_the_previous_answer_stored_by_decode(demo_up, demo_reference):
    """Decode stores a finished sequence's full blocks in the pool: a next turn that re-sends prompt + answer
    loads the blocks holding the answer too, not just the prompt's, and its output stays exact."""
    model, tokenizer = demo_reference
    block = 64
    ids = list(tokenizer.encode("Answers are cached as well as questions. " * 3))[:100]
    async with httpx.AsyncClient(base_url=demo_up.base_url, timeout=120) as client:
        answer = reference_ids(model, tokenizer, ids, 90)
        check_identical(await complete(client, "demo", ids, 90), answer, tokenizer)
        await asyncio.sleep(1.0)  # decode stores the blocks just after the request is served
        follow_up = ids + answer + list(tokenizer.encode(" And then?"))
        second = await complete(client, "demo", follow_up, 4)
        check_identical(second, reference_ids(model, tokenizer, follow_up, 4), tokenizer)
        # Decode held the KV of the prompt and every answer token but the last: its full blocks are reusable.
        held = len(ids) + len(answer) - 1
        assert held // block > len(ids) // block, "the answer must complete a block for this test to mean anything"
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == min(held // block, (len(follow_up) - 1) // block) * block


async def test_prefix_reuse_through_the_pool_is_exact_and_reported(demo_up, demo_reference):
    """A repeated prompt and every later turn of a chat load their prefix from the cache pool: cached_tokens
    says how much, and the output stays token-identical to transformers' generate."""
    import logging

    model, tokenizer = demo_reference
    block = 64  # TSUKIMI_CACHE_BLOCK_TOKENS default
    prompt = "The pool keeps what prefill computed. " * 6  # 228 tokens: 3 full blocks
    ids = tokenizer.encode(prompt)
    async with httpx.AsyncClient(base_url=demo_up.base_url, timeout=120) as client:
        first = await complete(client, "demo", prompt, 10)
        await asyncio.sleep(1.0)  # blocks are stored just after the first request is served
        second = await complete(client, "demo", prompt, 10)
        ref = reference_ids(model, tokenizer, ids, 10)
        check_identical(first, ref, tokenizer)
        check_identical(second, ref, tokenizer)
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(ids) - 1) // block * block

        # A long shared system prompt, as in production chat: every later turn reuses it and the turns so far.
        messages = [{"role": "system", "content": "You are the pool's chronicler. " * 40},
                    {"role": "user", "content": "Tell me about block keys."}]
        for turn in range(3):
            started = time.monotonic()
            ttft, content, usage = None, "", None
            async with client.stream("POST", "/v1/chat/completions", json={
                    "model": "demo", "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        ttft = ttft if ttft is not None else time.monotonic() - started
                        content += chunk["choices"][0]["delta"]["content"]
                    if chunk.get("usage"):
                        usage = chunk["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            logging.getLogger(__name__).info("turn %d: %d prompt tokens, %d cached, TTFT %.3fs", turn,
                                             usage["prompt_tokens"], cached, ttft or -1.0)
            chat_ids = tokenizer.encode_chat(messages)
            assert content == tokenizer.decode(reference_ids(model, tokenizer, chat_ids, 8))
            if turn > 0:
                # Every turn after the first reuses the conversation so far (all its full blocks but the last).
                assert cached >= (len(chat_ids) - 64) // block * block - block
            messages += [{"role": "assistant", "content": content},
                         {"role": "user", "content": f"And then? ({turn})"}]
            await asyncio.sleep(1.0)
