"""Chat prompts with known answer ids spliced in: exact ids with the demo byte tokenizer and a real BPE one; the
plain encoding whenever the answers round-trip or a boundary is not safe."""

from __future__ import annotations

import pytest
from tsukimi.text.chat_template import ChatTemplate
from tsukimi.text.tokenizer import TextTokenizer

from tests.unit.bpe_tokenizer import build_bpe

TURN1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is the answer?"}]


def turn2(answer: str) -> list[dict]:
    return [*TURN1, {"role": "assistant", "content": answer}, {"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    return build_bpe()


def ids_of(tok: TextTokenizer, *tokens: str) -> list[int]:
    return [tok.tokenizer.token_to_id(t) for t in tokens]


def test_bpe_answer_ids_that_do_not_round_trip_follow_turn_one(bpe):
    answer = ids_of(bpe, "Hello", ".", "ĊĊ", "W", "or", "ld")
    text = bpe.decode(answer)
    assert text == "Hello.\n\nWorld" and bpe.encode(text) != answer  # re-encoding splits "\n\n"
    im_end = bpe.tokenizer.token_to_id("<|im_end|>")
    prompt1 = bpe.encode_chat(TURN1)
    plain = bpe.encode_chat(turn2(text))
    spliced = bpe.encode_chat(turn2(text), {text: answer}.get)
    rest = bpe.encode("<|im_end|>\n<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n")
    assert spliced == prompt1 + answer + rest
    assert spliced[: len(prompt1) + len(answer) + 1] == prompt1 + answer + [im_end]
    assert plain == prompt1 + bpe.encode(text) + rest


def test_bpe_round_tripping_answers_give_the_plain_encoding(bpe):
    texts = ["Sure, here it is.", "Hello world again, hello there!", "The end.\n\n The answer is here."]
    for text in texts:
        known = {text: bpe.encode(text)}.get
        assert bpe.encode_chat(turn2(text), known) == bpe.encode_chat(turn2(text))
    messages = [*turn2(texts[0]), {"role": "assistant", "content": texts[1]}]
    known = {t: bpe.encode(t) for t in texts}.get
    assert bpe.encode_chat(messages, known) == bpe.encode_chat(messages)


def test_demo_tokenizer_splices_bytes_that_are_not_utf8():
    demo = TextTokenizer.load("demo")
    answer = [104, 0xFF, 105, 0xC3]  # "h", a stray byte, "i", half a character
    text = demo.decode(answer)
    assert text == "h\ufffdi\ufffd" and demo.encode(text) != answer
    prompt1 = demo.encode_chat(TURN1)
    spliced = demo.encode_chat(turn2(text), {text: answer}.get)
    assert spliced == prompt1 + answer + demo.encode("\n<|user|>\nHello there!\n<|assistant|>\n")
    # Round-tripping text: the plain encoding.
    assert demo.encode_chat(turn2("hé"), {"hé": demo.encode("hé")}.get) == demo.encode_chat(turn2("hé"))


def test_only_the_assistant_message_is_spliced_not_equal_text_elsewhere(bpe):
    answer = ids_of(bpe, "Hello", ".", "ĊĊ", "W", "or", "ld")
    text = bpe.decode(answer)
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text},
                {"role": "user", "content": text}]
    spliced = bpe.encode_chat(messages, {text: answer}.get)
    head = bpe.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
    tail = bpe.encode(f"<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
    assert spliced == head + answer + tail


def test_an_unsafe_boundary_drops_that_span_only(bpe):
    good = ids_of(bpe, "Hello", ".", "ĊĊ", "W", "or", "ld")
    # After "assistant\n", an answer starting with newlines merges with the template's newline when encoded
    # whole: splicing it would change the template's own tokens.
    bad = ids_of(bpe, "ĊĊ", "Hello")
    good_text, bad_text = bpe.decode(good), bpe.decode(bad)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": bad_text},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": good_text},
                {"role": "user", "content": "Hi"}]
    known = {good_text: good, bad_text: bad}.get
    head = bpe.encode(f"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n{bad_text}<|im_end|>\n"
                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    tail = bpe.encode("<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert bpe.encode(f"assistant\n{bad_text}") != bpe.encode("assistant\n") + bpe.encode(bad_text)
    assert bpe.encode_chat(messages, known) == head + good + tail
    # Alone, it is not spliced at all.
    assert bpe.encode_chat(turn2(bad_text), known) == bpe.encode_chat(turn2(bad_text))


def test_a_template_that_changes_the_content_is_not_spliced(bpe):
    stripping = build_bpe(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    answer = ids_of(stripping, "Hello", ".", "ĊĊ", "W", "or", "ld", "Ċ")
    text = stripping.decode(answer)
    assert stripping.encode_chat(turn2(text), {text: answer}.get) == stripping.encode_chat(turn2(text))
    # A content rendered twice is not spliced either.
    twice = TextTokenizer(bpe.tokenizer, bpe.eos_token_ids, 4096, ChatTemplate(
        "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}<|im_end|>{% endfor %}"))
    answer = ids_of(bpe, "Hello", ".", "ĊĊ", "W", "or", "ld")
    text = bpe.decode(answer)
    assert twice.encode_chat(turn2(text), {text: answer}.get) == twice.encode_chat(turn2(text))


def test_splicing_gives_up_after_a_few_unsafe_spans(bpe):
    from tsukimi.text.chat_splice import MAX_SPLICE_TRIES

    good = ids_of(bpe, "Hello", ".", "ĊĊ", "W", "or", "ld")
    bad = [ids_of(bpe, "ĊĊ", "Hello", ".", str(i)) for i in range(MAX_SPLICE_TRIES)]
    known = {bpe.decode(ids): ids for ids in [good, *bad]}.get

    def chat(answers: list[list[int]]) -> list[dict]:
        messages = []
        for ids in answers:
            messages += [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": bpe.decode(ids)}]
        return [*messages, {"role": "user", "content": "Hi"}]

    # One unsafe span fewer than the tries: the good one is spliced after dropping them.
    messages = chat([*bad[:-1], good])
    spliced = bpe.encode_chat(messages, known)
    plain = bpe.encode_chat(messages)
    assert spliced != plain and len(spliced) == len(plain) - 1  # "\n\n" one token, not two
    messages = chat([*bad, good])
    assert bpe.encode_chat(messages, known) == bpe.encode_chat(messages)
