"""Conductor -> prefill -> decode over a real NATS server, the services running in this event loop."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
import pytest
import torch

from tsukimi.common import subjects
from tsukimi.common.messages import (
    CancelRequest, GenerateRequest, SamplingParams, SubmitReply, TokenEvent, decode, encode,
)
from tsukimi.common.settings import Settings
from tsukimi.conductor.journal import RequestJournal
from tsukimi.conductor.service import ConductorService
from tsukimi.decode.service import DecodeService, build_engine
from tsukimi.model.loader import build_demo_model
from tsukimi.prefill.engine import PrefillEngine
from tsukimi.prefill.service import PrefillService

EOS = 256


@pytest.fixture(scope="module")
def model():
    return build_demo_model()


def reference(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generation, stopping at EOS like the server."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=EOS)
    return out[0, len(prompt):].tolist()


@pytest.fixture
async def cluster(nats_url, model, tmp_path, request):
    """One conductor, prefill and decode service in this loop; yields (nats client, services). Settings of a test's
    own: parametrize it indirectly with a dict of them."""
    settings = Settings(nats_url=nats_url, heartbeat_interval_s=0.2, database_url=f"sqlite:///{tmp_path}/j.db",
                        cluster_secret="pipeline-test", kv_arena_bytes=64 << 20,
                        # NOTE: small chunks, so concurrent prompts take turns chunk by chunk (and short ones share
                        # forwards) in every test here.
                        prefill_chunk_tokens=32).model_copy(update=getattr(request, "param", {}))
    stop = asyncio.Event()
    conductor = ConductorService(settings.model_copy(update={"instance_id": "c-" + uuid.uuid4().hex[:6]}),
                                 RequestJournal(settings.database_url))
    prefill = PrefillService(settings.model_copy(update={"instance_id": "p-" + uuid.uuid4().hex[:6]}),
                             PrefillEngine(model, settings.prefill_chunk_tokens), 4096)
    decoder = DecodeService(settings.model_copy(update={"instance_id": "d-" + uuid.uuid4().hex[:6]}),
                            build_engine(settings.model_copy(update={"max_batch_size": 8}), model))
    tasks = [asyncio.create_task(s.run(stop)) for s in (conductor, prefill, decoder)]
    nc = await nats.connect(nats_url)
    deadline = time.monotonic() + 10
    while len(conductor.registry.alive("prefill", time.monotonic())) + len(
            conductor.registry.alive("decode", time.monotonic())) < 2:
        assert time.monotonic() < deadline, "instances never registered"
        await asyncio.sleep(0.05)
    yield nc, conductor, prefill, decoder
    stop.set()
    done, pending = await asyncio.wait(tasks, timeout=30)
    for task in pending:
        task.print_stack()
    assert not pending, "a service did not shut down within 30 s"
    for task in done:
        task.result()
    await nc.close()


async def generate(nc, prompt: list[int], sampling: SamplingParams, cancel_after: int | None = None):
    """Submits like the gateway does; returns (tokens, finish reason, error)."""
    rid = uuid.uuid4().hex
    sub = await nc.subscribe(subjects.stream(rid))
    request = GenerateRequest(request_id=rid, model="demo", prompt_token_ids=prompt, sampling=sampling,
                              arrival_time=time.time())
    reply = decode((await nc.request(subjects.SUBMIT, encode(request), timeout=10)).data, SubmitReply)
    assert reply.is_accepted, reply.error
    events: dict[int, TokenEvent] = {}
    finish = error = None
    while finish is None and error is None:
        event = decode((await sub.next_msg(timeout=30)).data, TokenEvent)
        events[event.index] = event
        finish, error = event.finish_reason, event.error
        if cancel_after is not None and len(events) >= cancel_after:
            await nc.publish(subjects.CANCEL, encode(CancelRequest(request_id=rid, reason="client_disconnected")))
            break
    await sub.unsubscribe()
    tokens = [events[i].token_id for i in sorted(events) if events[i].token_id is not None]
    return rid, tokens, finish, error


async def test_greedy_matches_transformers_single(cluster, model):
    nc, *_ = cluster
    prompt = list(b"The quick brown fox jumps over the lazy dog.")
    _, tokens, finish, error = await generate(nc, prompt, SamplingParams(temperature=0, max_tokens=24,
                                                                            stop_token_ids=[EOS]))
    assert error is None
    assert tokens == reference(model, prompt, 24)
    assert finish == ("stop" if tokens[-1] == EOS else "length")


async def test_greedy_matches_transformers_concurrent(cluster, model):
    nc, _, prefill, _ = cluster
    prompts = [list(f"prompt number {i}: ".encode()) * (1 + 3 * i) for i in range(8)]
    lengths = [5 + 3 * i for i in range(8)]
    results = await asyncio.gather(*[
        generate(nc, p, SamplingParams(temperature=0, max_tokens=n, stop_token_ids=[EOS]))
        for p, n in zip(prompts, lengths)
    ])
    for prompt, n, (_, tokens, _, error) in zip(prompts, lengths, results):
        assert error is None
        assert tokens == reference(model, prompt, n)
    # Every prompt is cut into chunks of 32 tokens at most.
    assert prefill.chunks.num_forwards >= sum(-(-len(p) // 32) for p in prompts)


async def test_greedy_matches_transformers_short_prompts_sharing_forwards(cluster, model):
    nc, _, prefill, _ = cluster
    prompts = [list(f"q{i}?".encode()) * (1 + i % 3) for i in range(8)]
    results = await asyncio.gather(*[
        generate(nc, p, SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[EOS])) for p in prompts])
    for prompt, (_, tokens, _, error) in zip(prompts, results):
        assert error is None
        assert tokens == reference(model, prompt, 6)
    # Short prompts arriving together were packed into shared forwards.
    assert prefill.chunks.num_chunks == len(prompts) and prefill.chunks.num_forwards < len(prompts)


async def test_seeded_sampling_is_reproducible(cluster):
    nc, *_ = cluster
    prompt = list(b"Once upon a time")
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20)
    runs = [await generate(nc, prompt, params) for _ in range(2)]
    other = await generate(nc, prompt, SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=20))
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != other[1]


async def test_cancel_frees_decode_state(cluster):
    nc, _, _, decoder = cluster
    prompt = list(b"cancel me please")
    rid, tokens, finish, _ = await generate(nc, prompt, SamplingParams(temperature=0, max_tokens=2000),
                                            cancel_after=3)
    assert finish is None and len(tokens) >= 3
    deadline = time.monotonic() + 5
    while decoder.engine.num_running or decoder.engine.num_waiting or len(decoder.inbox):
        assert time.monotonic() < deadline, "decode kept the cancelled request"
        await asyncio.sleep(0.05)
    assert decoder.engine.kv.num_free_blocks == decoder.engine.kv.num_blocks


async def test_conductor_refuses_without_workers(nats_url, tmp_path):
    settings = Settings(nats_url=nats_url, instance_id="lonely-" + uuid.uuid4().hex[:6],
                        database_url=f"sqlite:///{tmp_path}/j.db")
    journal = RequestJournal(settings.database_url)
    conductor = ConductorService(settings, journal)
    stop = asyncio.Event()
    task = asyncio.create_task(conductor.run(stop))
    nc = await nats.connect(nats_url)
    try:
        # Served model name no worker of the other tests' clusters serves.
        request = GenerateRequest(request_id=uuid.uuid4().hex, model="nobody-serves-this", prompt_token_ids=[1, 2],
                                  sampling=SamplingParams(), arrival_time=time.time())
        await asyncio.sleep(0.2)
        reply = decode((await nc.request(subjects.SUBMIT, encode(request), timeout=5)).data, SubmitReply)
        assert not reply.is_accepted
        assert reply.error.http_status == 503 and reply.error.code == "no_capacity"
        await asyncio.sleep(0.3)
        assert journal.count("refused") == 1
    finally:
        stop.set()
        await task
        await nc.close()
