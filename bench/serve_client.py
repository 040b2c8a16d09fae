"""The load generator of `tsukimi bench serve`: sends a schedule open loop (each request at its time, never waiting
for earlier answers) to an OpenAI-compatible `/v1/completions` with streaming, and records what came back.

Times are seconds on `time.perf_counter()` from the run's start (see `serve_record` for what is recorded).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tsukimi.bench.serve_record import (
    CLIENT_OVERLOAD,
    CONNECTION,
    FAILED,
    OK,
    PENDING,
    REJECTED,
    TIMEOUT,
    TRUNCATED,
    UNFINISHED,
    RequestRecord,
    SseDecoder,
    SseLineSplitter,
    apply_event,
)
from tsukimi.bench.serve_workload import PlannedRequest

def completion_body(model: str, plan: PlannedRequest) -> dict:
    """The /v1/completions request of one planned request (greedy, streamed, usage in the last chunk)."""
    return {"model": model, "prompt": plan.prompt, "max_tokens": plan.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        return err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


async def send_one(client: httpx.AsyncClient, url: str, model: str, plan: PlannedRequest, rec: RequestRecord,
                   clock: Callable[[], float]) -> None:
    """Sends one request and records its answer (never raises but for cancellation)."""
    rec.sent_s = clock()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=completion_body(model, plan)) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                body = await resp.aread()
                if resp.status_code == 429:
                    rec.outcome, rec.retry_after = REJECTED, resp.headers.get("retry-after")
                    rec.message = _error_message(body)
                else:
                    rec.fail(f"http_{resp.status_code}", _error_message(body))
                return
            await _read_events(resp, rec, clock)
    except httpx.TimeoutException as exc:
        rec.fail(TIMEOUT, type(exc).__name__)
    except (httpx.HTTPError, OSError) as exc:
        rec.fail(CONNECTION, f"{type(exc).__name__}: {exc}")
    finally:
        rec.done_s = clock()
    if rec.outcome == PENDING:
        if rec.is_done_seen or rec.finish_reason is not None:
            rec.outcome = OK
        else:
            rec.fail(TRUNCATED, "the stream ended without [DONE]")


async def _read_events(resp: httpx.Response, rec: RequestRecord, clock: Callable[[], float]) -> None:
    """Records the events of a 200 stream until `[DONE]` or its end."""
    lines = SseLineSplitter()
    decoder = SseDecoder()
    async for chunk in resp.aiter_bytes():
        for line in lines.feed(chunk):
            data = decoder.feed(line)
            if data is not None and apply_event(rec, data, clock()):
                return
    for line in [*lines.flush(), ""]:
        data = decoder.feed(line)
        if data is not None and apply_event(rec, data, clock()):
            return


@dataclass
class RunOutput:
    """Records in schedule order and the wall time from the start until the last answer (or the drain's end)."""

    records: list[RequestRecord]
    elapsed_s: float


class Progress:
    """A one-line text bar on stderr: sent / scheduled, answered, rejected, failed, in flight."""

    WIDTH = 30

    def __init__(self, total: int, label: str = "", stream=None):
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr

    def show(self, records: list[RequestRecord], in_flight: int, elapsed_s: float, final: bool = False) -> None:
        counts = {OK: 0, REJECTED: 0, FAILED: 0}
        for r in records:
            if r.outcome in counts:
                counts[r.outcome] += 1
        filled = round(self.WIDTH * len(records) / self.total)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = (f"\r{self.label}[{bar}] {len(records)}/{self.total} scheduled, {counts[OK]} ok, "
                f"{counts[REJECTED]} rejected, {counts[FAILED]} failed, {in_flight} in flight, {elapsed_s:.0f}s ")
        self.stream.write(line + ("\n" if final else ""))
        self.stream.flush()


async def run_schedule(plans: list[PlannedRequest], url: str, model: str, *, max_outstanding: int = 256,
                       request_timeout_s: float = 120.0, drain_timeout_s: float = 30.0,
                       progress: Progress | None = None) -> RunOutput:
    """Sends every planned request at its time on one connection pool; waits at most `drain_timeout_s` after the
    last one for the outstanding answers, then cancels them (failed: unfinished)."""
    url = url.rstrip("/")
    limits = httpx.Limits(max_connections=max_outstanding, max_keepalive_connections=max_outstanding)
    timeout = httpx.Timeout(request_timeout_s, connect=min(10.0, request_timeout_s), pool=None)
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task] = set()
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.5)
            progress.show(records, len(tasks), clock())

    ticking = asyncio.create_task(ticker()) if progress else None
    try:
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            for plan in plans:
                delay = plan.arrival_s - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec = RequestRecord(plan.index, plan.arrival_s, plan.max_tokens)
                records.append(rec)
                if len(tasks) >= max_outstanding:
                    rec.fail(CLIENT_OVERLOAD, f"{max_outstanding} requests outstanding")
                    continue
                task = asyncio.create_task(send_one(client, url, model, plan, rec, clock))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=drain_timeout_s)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            ends = [r.done_s for r in records if r.done_s is not None]
            elapsed = max(ends + [r.arrival_s for r in records], default=0.0)
    finally:
        if ticking is not None:
            ticking.cancel()
            await asyncio.gather(ticking, return_exceptions=True)
    for rec in records:
        if rec.outcome == PENDING:
            rec.fail(UNFINISHED, f"no answer within {drain_timeout_s:g}s after the last arrival")
    if progress:
        progress.show(records, 0, elapsed, final=True)
    return RunOutput(records, elapsed)


async def model_cards(url: str, timeout_s: float = 10.0) -> list[dict]:
    """The model cards GET /v1/models lists (at least one, each with an `id`)."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        resp = await client.get(f"{url.rstrip('/')}/v1/models")
        resp.raise_for_status()
        body = resp.json()
    models = body.get("data") if isinstance(body, dict) else None
    is_list = isinstance(models, list) and all(
        isinstance(m, dict) and isinstance(m.get("id"), str) for m in models)
    if not is_list:
        raise RuntimeError(f"{url}/v1/models is not a list of models")
    if not models:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return models
