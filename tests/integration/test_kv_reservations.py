"""Decode's KV reservations live while their writer works, and a stale writer's writes are refused.

The services are those of test_pipeline's `cluster` fixture, with a reservation TTL of 1 s (decode sweeps every
second; prefill renews every 0.25 s). Prefill is made slower than the TTL by a pause before each forward (a
patched `ChunkScheduler._step`): with chunks of 32 tokens a 246-token prompt takes 8 forwards, its reservation
held from before the first of them to the hand-over after the last.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest
from tsukimi.common import subjects
from tsukimi.common.messages import KVReservation, KVReserve, SamplingParams, decode, encode
from tsukimi.transfer.batch import Op, Status, TransferRequest
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import NatsMetadataStore

from tests.integration.test_cancel_stages import PROMPT, assert_freed, baseline, next_event, submit, until
from tests.integration.test_pipeline import cluster, generate, model, reference  # noqa: F401  (fixtures, helpers)

TTL_S = 1.0
# Seconds prefill pauses before each forward: 8 forwards of one prompt take well over TTL_S plus a sweep period.
PAUSE_S = 0.4
SHORT_TTL = pytest.mark.parametrize("cluster", [{"kv_orphan_ttl_s": TTL_S}], indirect=True)
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def slow_down(prefill, monkeypatch) -> None:
    step = prefill.chunks._step

    def paused(parts):
        time.sleep(PAUSE_S)
        return step(parts)

    monkeypatch.setattr(prefill.chunks, "_step", paused)


@SHORT_TTL
async def test_a_prefill_slower_than_the_ttl_keeps_its_reservation_and_answers_exactly(cluster, model,  # noqa: F811
                                                                                        monkeypatch):
    nc, _, prefill, decoder = cluster
    buffers = baseline(prefill, decoder)
    prompts = [PROMPT, list(b"A second prompt, prefilled alongside. ") * 5, list(b"and a short third")]
    unhurried = [tokens for _, tokens, _, _ in await asyncio.gather(*[generate(nc, p, GREEDY) for p in prompts])]
    assert unhurried == [reference(model, p, GREEDY.max_tokens) for p in prompts]
    slow_down(prefill, monkeypatch)
    started = time.monotonic()
    results = await asyncio.gather(*[generate(nc, p, GREEDY) for p in prompts])
    # The setting this test is about: the long prompts' writers held their reservations past TTL and a sweep.
    assert time.monotonic() - started > 2 * TTL_S + 1.0
    assert [error for _, _, _, error in results] == [None] * 3
    assert [tokens for _, tokens, _, _ in results] == unhurried
    await assert_freed(prefill, decoder, buffers)


@SHORT_TTL
async def test_a_writer_that_stops_renewing_loses_its_blocks_and_its_request_fails_cleanly(cluster,  # noqa: F811
                                                                                            model, monkeypatch):
    nc, _, prefill, decoder = cluster
    buffers = baseline(prefill, decoder)
    slow_down(prefill, monkeypatch)
    monkeypatch.setattr(prefill.held, "by_decode", lambda: {})  # renews nothing: as if its renewals were lost
    _, sub = await submit(nc, PROMPT, 24)
    first = await next_event(sub, timeout=30)
    # Its reservation was freed as an orphan meanwhile: the writes into it were refused.
    assert first.index == 0 and first.error is not None and first.error.code == "kv_transfer_failed"
    assert first.error.http_status == 503 and "write refused" in first.error.message
    await assert_freed(prefill, decoder, buffers)
    monkeypatch.undo()
    _, tokens, _, error = await generate(nc, PROMPT, GREEDY)  # the workers serve on
    assert error is None and tokens == reference(model, PROMPT, GREEDY.max_tokens)


@SHORT_TTL
@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_a_stale_writer_cannot_overwrite_the_next_owner_of_its_blocks(cluster, model, monkeypatch,  # noqa: F811
                                                                          transport):
    nc, _, prefill, decoder = cluster
    buffers = baseline(prefill, decoder)
    kv = decoder.engine.kv
    # The stale writer: a reservation of every block, written once, then left without renewals.
    reply = await nc.request(subjects.decode_reserve(decoder.instance_id), encode(KVReserve(
        request_id="stale-" + uuid.uuid4().hex, num_tokens=kv.num_blocks * kv.block_tokens)), timeout=5)
    stale = decode(reply.data, KVReservation)
    assert stale.is_accepted and stale.nonce != 0 and len(stale.block_ids) == kv.num_blocks
    writer = await TransferEngine("stale-" + uuid.uuid4().hex[:6], b"pipeline-test",
                                  NatsMetadataStore(nc, decoder.settings.segment_ttl_s),
                                  force_transport=transport).start()
    try:
        garbage = writer.register(np.full(kv.block_bytes, 0x7F, dtype=np.uint8), read_only=True)

        async def write_blocks(num_blocks: int) -> list:
            statuses = await writer.wait(await writer.submit([
                TransferRequest(Op.WRITE, garbage, 0, decoder.transfer.segment_name, stale.buffer_id,
                                block_id * kv.block_bytes, kv.block_bytes, stale.nonce)
                for block_id in stale.block_ids[:num_blocks]]))
            assert {s.transport for s in statuses} == {transport}
            return statuses

        assert [s.status for s in await write_blocks(1)] == [Status.COMPLETED]  # its own, while it holds them
        await until(lambda: len(decoder.inbox) == 0, "the silent reservation to be swept", timeout=5)
        # The blocks go back to the free list in their order (a TTL after the sweep): the next request gets the first.
        slow_down(prefill, monkeypatch)
        num_blocks = kv.num_blocks_for(len(PROMPT))
        answer = asyncio.create_task(generate(nc, PROMPT, SamplingParams(temperature=0, max_tokens=40)))
        refusals: set[str] = set()
        while not answer.done():
            for st in await write_blocks(num_blocks):
                assert st.status == Status.FAILED and "write refused" in st.error
                refusals.add("owned by another" if "is owned by another writer" in st.error else
                             "free" if "is free" in st.error else st.error)
            await asyncio.sleep(0.01)
        # Refused while the request's prefill held the blocks, and after its sequence took them.
        assert refusals == {"owned by another", "free"}
        _, tokens, _, error = answer.result()
        assert error is None and tokens == reference(model, PROMPT, 40)
        await assert_freed(prefill, decoder, buffers)
    finally:
        await writer.close()
