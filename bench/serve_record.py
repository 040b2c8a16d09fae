"""One streamed request's record: what `tsukimi bench serve` saw of it, and the SSE parsing that fills it. Pure.

Times are seconds from the run's start. A token's time is the arrival of the SSE chunk that carried its text: a
server may put several tokens in one chunk (a detokenizer holding back an incomplete UTF-8 character does), so
chunk counts and usage's `completion_tokens` are both kept.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

OK, REJECTED, FAILED, PENDING = "ok", "rejected", "failed", "pending"
# Failure kinds besides `http_<status>`.
CLIENT_OVERLOAD = "client_overload"  # --max-outstanding requests were already out: never sent
UNFINISHED = "unfinished"  # still streaming when the drain time ran out
TIMEOUT = "timeout"
CONNECTION = "connection"
STREAM_ERROR = "stream_error"  # an error event inside a 200 stream
TRUNCATED = "truncated"  # the stream ended without [DONE] or a finish reason


@dataclass
class RequestRecord:
    """What happened to one planned request."""

    index: int
    arrival_s: float
    max_tokens: int
    sent_s: float | None = None
    status: int | None = None
    outcome: str = PENDING
    error: str | None = None
    message: str | None = None
    retry_after: str | None = None
    # Arrival of each chunk that carried output text.
    token_times: list[float] = field(default_factory=list)
    # Arrival of the chunk that carried the finish reason.
    finish_s: float | None = None
    finish_reason: str | None = None
    done_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    is_done_seen: bool = False

    def fail(self, kind: str, message: str | None = None) -> None:
        """Marks it failed (the first failure wins)."""
        if self.outcome == FAILED:
            return
        self.outcome, self.error, self.message = FAILED, kind, message

    @property
    def output_times(self) -> list[float]:
        """When its output tokens were out: the text chunks, or the finish chunk alone for an empty answer."""
        if self.token_times:
            return self.token_times
        return [self.finish_s] if self.finish_s is not None else []

    @property
    def num_output_tokens(self) -> int:
        """Tokens received: usage's count when the server sent it, else the text chunks."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_times)


# An event stream's line ends: CRLF, CR or LF, and no other (`str.splitlines` also splits at U+2028, U+0085,
# U+001C..., which JSON carries unescaped inside strings).
_LINE_END = re.compile(rb"\r\n|\r|\n")
BOM = "\ufeff"


class SseLineSplitter:
    """The lines (without their ends) of an event stream fed as bytes in chunks of any size: a chunk may end inside
    a CRLF or a UTF-8 character. Lines are decoded as UTF-8 (bad bytes as U+FFFD) and a leading BOM is dropped,
    as the SSE spec says."""

    def __init__(self) -> None:
        self._pending = b""
        # The last chunk ended with CR: an LF starting the next one ends no line.
        self._is_after_cr = False
        self._is_first_line = True

    def feed(self, chunk: bytes) -> list[str]:
        if not chunk:
            return []
        if self._is_after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._is_after_cr = False
        data = self._pending + chunk
        lines = []
        start = 0
        for end in _LINE_END.finditer(data):
            lines.append(self._text(data[start:end.start()]))
            start = end.end()
            self._is_after_cr = end.group() == b"\r" and start == len(data)
        self._pending = data[start:]
        return lines

    def flush(self) -> list[str]:
        """At the end of the stream: the last line if it had no line end."""
        pending, self._pending = self._pending, b""
        return [self._text(pending)] if pending else []

    def _text(self, line: bytes) -> str:
        text = line.decode("utf-8", errors="replace")
        if self._is_first_line:
            self._is_first_line = False
            text = text.removeprefix(BOM)
        return text


class SseDecoder:
    """Server-sent events from lines (without their newline): `feed` returns an event's data when a blank line
    ends it (several `data:` lines joined by newlines), else None; `flush` ends the stream."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def apply_event(rec: RequestRecord, data: str, now: float) -> bool:
    """Records one event's data received at `now`; True for `[DONE]` (the end of the stream)."""
    if data.strip() == "[DONE]":
        rec.is_done_seen = True
        return True
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        rec.fail(STREAM_ERROR, f"not JSON: {data[:80]!r}")
        return False
    if not isinstance(obj, dict):
        return False
    if obj.get("error") is not None:
        err = obj["error"]
        rec.fail(STREAM_ERROR, err.get("message") if isinstance(err, dict) else str(err))
        return False
    usage = obj.get("usage")
    if isinstance(usage, dict):
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        rec.cached_tokens = details.get("cached_tokens") if isinstance(details, dict) else None
    for choice in obj.get("choices") or []:
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            rec.token_times.append(now)
        if choice.get("finish_reason"):
            rec.finish_reason = choice["finish_reason"]
            rec.finish_s = now
    return False


def write_records(path: str, load: dict, prompt_lens: list[int], records: list[RequestRecord]) -> None:
    """Appends one JSON line per record to `path`: the run's `load` fields, the planned prompt length and every
    field of the record."""
    with open(path, "a") as f:
        for prompt_len, rec in zip(prompt_lens, records):
            f.write(json.dumps({**load, "prompt_len": prompt_len, **dataclasses.asdict(rec)}) + "\n")
