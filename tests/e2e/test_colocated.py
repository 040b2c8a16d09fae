"""The colocated baseline through `tsukimi up --colocated` and HTTP: each worker process does prefill and decode of
its requests on one device; outputs stay token-identical to transformers' greedy generate, with whole and
chunked prefill, with and without its own prefix cache."""

from __future__ import annotations

import re

import httpx
import pytest

from .conftest import start_up, stop_up
from .test_up import (  # noqa: F401 (fixture)
    PROMPTS, check_identical, check_single_and_concurrent, complete, demo_reference, reference_ids,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def colocated_up(tmp_path_factory):
    deployment = start_up(tmp_path_factory, "--model", "demo", "--colocated")
    yield deployment
    code, orphans = stop_up(deployment)
    assert code == 0 and orphans == [], deployment.log()[-3000:]


@pytest.fixture(scope="module")
def chunked_up(tmp_path_factory):
    deployment = start_up(tmp_path_factory, "--model", "demo", "--colocated", "--colocated-instances", "1",
                          "--chunked-prefill", "16", "--colocated-prefix-cache")
    yield deployment
    code, orphans = stop_up(deployment)
    assert code == 0 and orphans == [], deployment.log()[-3000:]


# Output lengths of the concurrent requests.
LENGTHS = [6 + 4 * i for i in range(len(PROMPTS))]


async def test_colocated_greedy_matches_transformers_on_both_instances(colocated_up, demo_reference):
    model, tokenizer = demo_reference
    await check_single_and_concurrent(colocated_up.base_url, model, tokenizer, PROMPTS[2], 24, LENGTHS)
    log = colocated_up.log()
    # Every request's prefill and decode ran in the same process, and both instances served.
    placed = re.findall(r"placed on prefill (\S+)-prefill \(reusing \d+ blocks\), decode (\S+)-decode;", log)
    assert len(placed) == 1 + len(PROMPTS)
    assert all(p == d for p, d in placed), placed
    assert len({p for p, _ in placed}) == 2
    assert re.search(r"^\S+ \S+ cachestore ", log, re.M) is None  # no pool


async def test_colocated_chunked_prefill_and_own_prefix_cache(chunked_up, demo_reference):
    model, tokenizer = demo_reference
    await check_single_and_concurrent(chunked_up.base_url, model, tokenizer, PROMPTS[2], 24, LENGTHS)
    # A prompt of 3 full blocks of 64 tokens and more, twice: the second reuses 2 blocks from the instance's own
    # cache (it keeps the last token of a block-aligned prompt to compute), output identical.
    prompt = "The shared system prompt of a chat. " * 8
    ids = tokenizer.encode(prompt)
    ref = reference_ids(model, tokenizer, ids, 12)
    async with httpx.AsyncClient(base_url=chunked_up.base_url, timeout=120) as client:
        first = await complete(client, "demo", prompt, 12)
        second = await complete(client, "demo", prompt, 12)
    check_identical(first, ref, tokenizer)
    check_identical(second, ref, tokenizer)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(ids) - 1) // 64 * 64
    assert "chunked prefill 16 tokens, local prefix cache" in chunked_up.log()
