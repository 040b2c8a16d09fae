"""Incremental detokenization with stop strings: output token ids in, text safe to show the client out. Pure.

Two things make "decode the new token and append it" wrong:

* Byte-level tokenizers split one character over several tokens; decoding a prefix of such a sequence gives
  U+FFFD. Text ending in U+FFFD is held back until a later token completes the character (or the output ends).
* Tokenizers that mark word boundaries in the token (SentencePiece's "▁") decode a lone token differently
  from the same token after others. So text is decoded over a small window of preceding tokens (seeded with
  the prompt's last tokens) and only the part after the window's already-shown text is new: the classic
  prefix/read offset scheme of TGI and vLLM.

Stop strings are searched in the decoded text; the text is cut before the earliest match. While generating,
a suffix that could be the start of a stop string is held back, so nothing shown ever has to be taken back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the output, so the first output token decodes as it would mid-text.
CONTEXT_TOKENS = 5


class Detokenizer:
    """Turns one request's output tokens, pushed one at a time, into text deltas (see module doc)."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: Sequence[str] = (),
        context_ids: Sequence[int] = (),
    ):
        self._decode = decode
        self._ids: list[int] = list(context_ids[-CONTEXT_TOKENS:]) if context_ids else []
        # Window start and end of the tokens whose text is already in `_text`.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # Output text decoded so far (complete characters only; cut at a stop string once one is found).
        self._text = ""
        # Characters of `_text` handed out.
        self._emitted = 0
        # Characters of `_text` already searched for stop strings.
        self._searched = 0
        self._stops = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self._stops), default=0)
        # The stop string that ended the text, once one did.
        self.stop_string: str | None = None
        # Output tokens pushed.
        self.num_tokens = 0

    @property
    def is_stopped(self) -> bool:
        """True once a stop string was found; later tokens are ignored."""
        return self.stop_string is not None

    @property
    def text(self) -> str:
        """The output text so far, held-back text included, cut before the stop string once one matched."""
        return self._text

    def push(self, token_id: int) -> str:
        """Adds the next output token; returns the text that became safe to show (maybe "")."""
        if self.is_stopped:
            return ""
        self._ids.append(token_id)
        self.num_tokens += 1
        self._text += self._next_piece(is_final=False)
        return self._release(is_final=False)

    def flush(self) -> str:
        """At the end of the output: everything still held back (incomplete characters as U+FFFD)."""
        if self.is_stopped:
            return ""
        self._text += self._next_piece(is_final=True)
        return self._release(is_final=True)

    def _next_piece(self, is_final: bool) -> str:
        """New text of the tokens after the window's read offset, or "" while it ends mid-character."""
        if self._read_offset >= len(self._ids) and not is_final:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            # NOTE: e.g. a special token that decodes to nothing; or a character still incomplete.
            if len(new_text) == len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
                self._advance()
            return ""
        if new_text.endswith(REPLACEMENT_CHAR) and not is_final:
            return ""
        piece = new_text[len(prefix_text) :]
        self._advance()
        return piece

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def _release(self, is_final: bool) -> str:
        """Hands out the new text up to a stop string or up to what might start one."""
        text = self._text
        hold = 0
        if self._stops:
            start = max(0, self._searched - self._max_stop + 1)
            hit: tuple[int, str] | None = None
            for stop in self._stops:
                at = text.find(stop, start)
                if at >= 0 and (hit is None or at < hit[0]):
                    hit = (at, stop)
            if hit is not None:
                at, self.stop_string = hit
                self._text = text[:at]
                out = text[self._emitted : at]
                self._emitted = max(self._emitted, at)
                return out
            self._searched = len(text)
            if not is_final:
                hold = self._partial_stop_len(text)
        end = max(self._emitted, len(text) - hold)
        out = text[self._emitted : end]
        self._emitted = end
        return out

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
