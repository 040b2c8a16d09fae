"""The token ids of the chat answers the gateway gave, by their exact text, for the turns that send them back. Pure.

A chat client sends the previous answers back as assistant messages; their re-encoded text may differ from the
ids the model generated (and whose KV decode stored in the pool), so the gateway remembers those ids and the
prompt uses them (`TextTokenizer.encode_chat`'s `known_ids`). Only ids that decode to exactly the text the client
got are remembered.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence

# Bytes counted per remembered token id (stored as unsigned 32-bit integers).
ID_BYTES = 4
# Output tokens searched back from the end for where a text cut by a stop string ends.
STOP_LOOKBACK_TOKENS = 32


def entry_bytes(text: str, num_ids: int) -> int:
    """Bytes an answer counts against the memory's budget: its UTF-8 text and its ids."""
    return len(text.encode("utf-8", "surrogatepass")) + ID_BYTES * num_ids


class AnswerMemory:
    """(model, answer text) -> the answer's token ids; least recently used first out, at most `max_bytes` in all
    (see `entry_bytes`). Thread-safe: prompts are encoded in worker threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], array] = OrderedDict()
        self._num_bytes = 0
        self._lock = threading.Lock()

    @property
    def is_enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    def remember(self, model: str, text: str, ids: Sequence[int]) -> bool:
        """Keeps `ids` as the token ids of `text` (replacing earlier ones); False when it alone exceeds the
        budget (or is empty)."""
        size = entry_bytes(text, len(ids))
        if not text or not ids or size > self.max_bytes:
            return False
        key = (model, text)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._num_bytes -= entry_bytes(text, len(old))
            self._entries[key] = array("I", ids)
            self._num_bytes += size
            while self._num_bytes > self.max_bytes:
                (_, evicted_text), evicted = self._entries.popitem(last=False)
                self._num_bytes -= entry_bytes(evicted_text, len(evicted))
        return True

    def ids_of(self, model: str, text: str) -> list[int] | None:
        """The remembered ids of `text` (now the most recently used), or None."""
        with self._lock:
            ids = self._entries.get((model, text))
            if ids is None:
                return None
            self._entries.move_to_end((model, text))
            return ids.tolist()


def answer_ids(
    output_ids: Sequence[int],
    text: str,
    *,
    decode: Callable[[list[int]], str],
    eos_token_ids: Collection[int],
    is_cut: bool,
) -> list[int] | None:
    """The ids among an answer's `output_ids` that are exactly its returned `text`, or None when not known.

    A final end-of-sequence token is not part of the text (the template writes the turn's end). `is_cut`: a stop
    string cut the text; its ids are the leading ones that decode to it, if the cut falls between two tokens.
    """
    # NOTE: bytes that are not UTF-8 reach the client as U+FFFD, which it sends back; the model's own ids would
    # then stand for other text than the client's, so such an answer is not remembered (its next turn is encoded
    # from the text, as the client wrote it).
    ids = list(output_ids)
    if ids and ids[-1] in eos_token_ids:
        ids.pop()
    if not text or not ids or "\ufffd" in text:
        return None
    lengths = range(len(ids), max(0, len(ids) - STOP_LOOKBACK_TOKENS), -1) if is_cut else (len(ids),)
    for n in lengths:
        if decode(ids[:n]) == text:
            return ids[:n]
    return None
