"""Tokenizer and chat templates (torch-free, used by the gateway)."""

import pytest

from tsukimi.text.chat_template import PLAIN_TEMPLATE, ChatTemplate, TemplateError
from tsukimi.text.tokenizer import TextTokenizer, save_demo_tokenizer


def test_demo_tokenizer_is_byte_level_and_roundtrips():
    tok = TextTokenizer.load("demo")
    text = "héllo wörld 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == [256] and tok.vocab_size == 257
    assert tok.decode([104, 105, 256]) == "hi"


def test_plain_chat_template_is_the_documented_one():
    tok = TextTokenizer.load("demo")
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert tok.chat_template.render(msgs) == "<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\n"
    assert tok.encode_chat(msgs) == list(b"<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\n")
    assert ChatTemplate.plain().source == PLAIN_TEMPLATE


def test_checkpoint_tokenizer_uses_its_template_and_matches_transformers(tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}"
                "{% endif %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    save_demo_tokenizer(str(tmp_path), chat_template=template)
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 128, "eos_token_id": 256}')
    tok = TextTokenizer.load(str(tmp_path))
    assert tok.max_model_len == 128 and tok.eos_token_ids == [256]
    msgs = [{"role": "user", "content": "hey"}]
    assert tok.chat_template.render(msgs) == "[user]hey<|endoftext|>[assistant]"
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.encode_chat(msgs) == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                            return_dict=False)
    with pytest.raises(TemplateError, match="no bad roles"):
        tok.encode_chat([{"role": "bad", "content": "x"}])


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.load(str(tmp_path))
