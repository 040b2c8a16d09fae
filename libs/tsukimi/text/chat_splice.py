"""A chat prompt's token ids with the known ids of some assistant messages spliced in, not re-encoded. Pure.

Re-encoding an answer's text does not always give back the ids the model generated (byte-level BPE splits a
generated "\\n\\n" token in two; bytes that are not UTF-8 come back as U+FFFD), so the next turn's prompt would
miss the KV cached for the answer. The template renders text, so ids are spliced: the conversation is rendered
once more with a unique mark in place of each known content, which gives each content's span in the rendered
text; the text around the spans is encoded and the known ids go in between.

Exactly right or not at all: spans are kept only when encoding the pieces one by one, with the contents
re-encoded, gives the very ids of encoding the whole text (no merge, pre-token or normalization crosses a
boundary: e.g. the text before an answer ends with the template's `<|im_start|>assistant\\n` and the one after
starts with a special token). So a content whose ids round-trip gives the plain encoding, one that does not
gives its known ids between the plain encodings of the rest, and a span whose boundary is not safe is dropped
(its text encoded like the rest).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

from tsukimi.text.chat_template import ChatTemplate, TemplateError

# Tries at splicing (each drops a span with an unsafe boundary and encodes the whole prompt again) before the
# plain encoding.
MAX_SPLICE_TRIES = 4
# Encodes texts, each on its own, with no special tokens added.
EncodeBatch = Callable[[list[str]], list[list[int]]]
# The known token ids of an assistant message's content, or None.
KnownIds = Callable[[str], Sequence[int] | None]


def encode_chat_spliced(
    template: ChatTemplate, encode_batch: EncodeBatch, messages: list[dict], known_ids: KnownIds
) -> list[int]:
    """Token ids of `messages` rendered by `template`, the known ids in place of their contents' (module doc)."""
    text = template.render(messages)
    spans = _spans(template, messages, text, known_ids)
    plain = encode_batch([text])[0]
    for _ in range(MAX_SPLICE_TRIES):
        if not spans:
            break
        pieces = _pieces(text, spans)
        encoded = encode_batch(pieces + [text[start:end] for start, end, _ in spans])
        # The pieces and the re-encoded contents in text order: piece 0, content 0, piece 1, ...
        parts = [encoded[0]]
        for j in range(len(spans)):
            parts += [encoded[len(pieces) + j], encoded[j + 1]]
        at = _first_difference(parts, plain)
        if at is None:
            spliced = list(parts[0])
            for j, (_, _, ids) in enumerate(spans):
                spliced += [*ids, *parts[2 * j + 2]]
            return spliced
        spans.pop(_nearest_span(parts, at))
    return plain


def _spans(
    template: ChatTemplate, messages: list[dict], text: str, known_ids: KnownIds
) -> list[tuple[int, int, Sequence[int]]]:
    """(start, end, ids) in `text` of the assistant contents with known ids, in order; [] when none is found
    exactly (each mark rendered once, and the marked text with the contents put back is `text`)."""
    known: dict[int, Sequence[int]] = {}
    for i, message in enumerate(messages):
        content = message.get("content")
        if message.get("role") == "assistant" and isinstance(content, str) and content:
            ids = known_ids(content)
            if ids:
                known[i] = ids
    nonce = secrets.token_hex(8)
    while known:
        marks = {i: f"<tsukimi-answer-{nonce}-{i}>" for i in known}
        try:
            marked = template.render(
                [{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(messages)]
            )
        except TemplateError:
            return []
        once = {i for i, mark in marks.items() if marked.count(mark) == 1}
        if len(once) == len(marks):
            break
        known = {i: known[i] for i in once}
    if not known:
        return []
    order = sorted(known, key=lambda i: marked.index(marks[i]))
    spans = []
    rebuilt = []
    cursor = 0
    length = 0
    for i in order:
        at = marked.index(marks[i])
        rebuilt.append(marked[cursor:at])
        length += at - cursor
        content = messages[i]["content"]
        spans.append((length, length + len(content), known[i]))
        rebuilt.append(content)
        length += len(content)
        cursor = at + len(marks[i])
    rebuilt.append(marked[cursor:])
    # NOTE: a template that changes a content (strips it, drops an earlier turn's reasoning) renders it
    # differently from its mark: nothing is spliced then.
    return spans if "".join(rebuilt) == text else []


def _pieces(text: str, spans: list[tuple[int, int, Sequence[int]]]) -> list[str]:
    """The texts before, between and after the spans."""
    pieces = []
    cursor = 0
    for start, end, _ in spans:
        pieces.append(text[cursor:start])
        cursor = end
    pieces.append(text[cursor:])
    return pieces


def _first_difference(parts: list[list[int]], plain: list[int]) -> int | None:
    """Index of the first id where the parts joined differ from `plain`; None when they are equal."""
    at = 0
    for part in parts:
        for token in part:
            if at >= len(plain) or plain[at] != token:
                return at
            at += 1
    return None if at == len(plain) else at


def _nearest_span(parts: list[list[int]], at: int) -> int:
    """The span (parts 1, 3, 5, ...) whose ids lie at or nearest to id index `at`."""
    best, best_distance = 0, None
    start = len(parts[0])
    for j in range(len(parts) // 2):
        end = start + len(parts[2 * j + 1])
        distance = 0 if start <= at < end else min(abs(at - start), abs(at - end))
        if best_distance is None or distance < best_distance:
            best, best_distance = j, distance
        start = end + len(parts[2 * j + 2])
    return best
