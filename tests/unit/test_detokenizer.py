"""Incremental detokenization: multi-byte characters split over tokens, stop strings, hold-back."""

from __future__ import annotations

import pytest
from tsukimi.text.detokenizer import Detokenizer
from tsukimi.text.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.load("demo")


def run(tok: TextTokenizer, text: str, stop=(), extra_ids=()) -> tuple[list[str], str, Detokenizer]:
    detok = Detokenizer(tok.decode, stop=stop)
    pieces = [detok.push(t) for t in [*tok.encode(text), *extra_ids]]
    return pieces, detok.flush(), detok


def test_ascii_streams_token_by_token(tok):
    pieces, tail, detok = run(tok, "hello")
    assert pieces == ["h", "e", "l", "l", "o"]
    assert tail == ""
    assert detok.text == "hello"


def test_multibyte_characters_are_held_until_complete(tok):
    # "é" is 2 bytes, "日" 3 bytes, "🙂" 4 bytes: one token per byte in the demo tokenizer.
    pieces, tail, detok = run(tok, "é日🙂!")
    assert pieces == ["", "é", "", "", "日", "", "", "", "🙂", "!"]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == "é日🙂!"
    assert detok.num_tokens == 10


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok):
    ids = tok.encode("a日")[:-1]  # "a" + 2 of the 3 bytes of "日"
    detok = Detokenizer(tok.decode)
    assert [detok.push(t) for t in ids] == ["a", "", ""]
    assert detok.flush() == "\ufffd"


def test_invalid_byte_followed_by_text_is_not_held_forever(tok):
    detok = Detokenizer(tok.decode)
    assert detok.push(0xE6) == ""  # a lead byte...
    assert detok.push(ord("x")) == "\ufffdx"  # ...that never completes


def test_special_tokens_are_dropped(tok):
    pieces, tail, _ = run(tok, "ok", extra_ids=[256])
    assert "".join(pieces) + tail == "ok"


def test_stop_string_truncates_before_it(tok):
    pieces, tail, detok = run(tok, "Hello world. Bye", stop=["."])
    assert "".join(pieces) + tail == "Hello world"
    assert detok.stop_string == "."
    assert detok.text == "Hello world"
    assert detok.is_stopped
    assert detok.push(ord("z")) == ""  # ignored once stopped


def test_stop_string_spanning_tokens_is_held_back_then_dropped(tok):
    detok = Detokenizer(tok.decode, stop=["END"])
    out = [detok.push(t) for t in tok.encode("abEN")]
    assert out == ["a", "b", "", ""]  # "E", "EN" could start "END"
    assert detok.push(ord("D")) == ""
    assert detok.is_stopped and detok.text == "ab"


def test_held_back_prefix_is_released_when_it_diverges(tok):
    detok = Detokenizer(tok.decode, stop=["END"])
    out = [detok.push(t) for t in tok.encode("xENx")]
    assert out == ["x", "", "", "ENx"]
    assert not detok.is_stopped


def test_held_back_prefix_is_released_at_the_end(tok):
    detok = Detokenizer(tok.decode, stop=["END"])
    out = [detok.push(t) for t in tok.encode("xEN")]
    assert out == ["x", "", ""]
    assert detok.flush() == "EN"
    assert detok.text == "xEN"


def test_earliest_of_several_stop_strings_wins(tok):
    pieces, tail, detok = run(tok, "one two three", stop=["three", "two", "tw"])
    assert "".join(pieces) + tail == "one "
    assert detok.stop_string in ("two", "tw")


def test_multibyte_stop_string_split_over_tokens(tok):
    pieces, tail, detok = run(tok, "abc日本def", stop=["本"])
    assert "".join(pieces) + tail == "abc日"
    assert detok.stop_string == "本"


def test_stop_string_at_the_very_start(tok):
    pieces, _, detok = run(tok, "STOPabc", stop=["STOP"])
    assert pieces == [""] * 7
    assert detok.text == "" and detok.is_stopped


def test_prompt_context_does_not_leak_into_output(tok):
    prompt = tok.encode("The prompt")
    detok = Detokenizer(tok.decode, context_ids=prompt)
    out = [detok.push(t) for t in tok.encode(" answer")]
    assert "".join(out) + detok.flush() == " answer"


def test_concatenated_deltas_equal_full_decode_on_random_bytes(tok):
    import random

    rng = random.Random(7)
    for _ in range(50):
        ids = [rng.randrange(0, 257) for _ in range(rng.randrange(1, 40))]
        detok = Detokenizer(tok.decode)
        text = "".join(detok.push(t) for t in ids) + detok.flush()
        assert text == tok.decode(ids)
