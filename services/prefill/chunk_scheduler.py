"""Whose prefill chunks run in the next forward: the prompts in progress on a prefill worker share its one device
a forward at a time, the one with the fewest tokens left first (ties in arrival order), a chunk of at most the
engine's chunk size: a short prompt is not held behind a long one's whole length. Short prompts (at most
`pack_tokens` left) are packed together into one forward up to the chunk size, which saves each its own forward's
fixed cost; a longer prompt runs alone, as its own forward is as efficient and sharing would add attention across
prompts. Without chunking a forward takes one whole prompt. Forwards run in a worker thread; plain asyncio, no bus."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from tsukimi.prefill.engine import PrefillJob, PrefillStopped

# (job, tokens to compute) per prompt in one forward -> the jobs that stopped (see `PrefillEngine.step`).
StepFn = Callable[[list[tuple[PrefillJob, int]]], dict[PrefillJob, PrefillStopped]]


def plan(remaining: list[int], budget_tokens: int, pack_tokens: int) -> list[tuple[int, int]]:
    """Which prompts feed the next forward and how many tokens each: (index into `remaining`, tokens) for the
    prompts in `remaining` order (callers sort it: fewest left first). The first prompt gets up to `budget_tokens`
    (all it has without chunking, a budget of 0); while the forward's prompts all have at most `pack_tokens` left,
    the next ones join it whole as long as they fit in the budget."""
    if not remaining:
        return []
    if budget_tokens <= 0:
        return [(0, remaining[0])]
    parts = [(0, min(remaining[0], budget_tokens))]
    used = parts[0][1]
    if remaining[0] > pack_tokens:
        return parts
    for index, num_left in enumerate(remaining[1:], start=1):
        if num_left > pack_tokens or used + num_left > budget_tokens:
            break
        parts.append((index, num_left))
        used += num_left
    return parts


class ChunkScheduler:
    """Runs concurrent requests' prefill jobs to their ends, packing their chunks into shared forwards."""

    def __init__(self, step: StepFn, budget_tokens: int, pack_tokens: int = 0):
        self._step = step
        # Prompt tokens per forward; 0: one whole prompt per forward.
        self.budget_tokens = budget_tokens
        # Prompts with at most this many tokens left share forwards; 0: none does.
        self.pack_tokens = pack_tokens
        # Jobs in progress -> (arrival order, future its `run` awaits).
        self._jobs: dict[PrefillJob, tuple[int, asyncio.Future]] = {}
        self._order = itertools.count()
        self._driver: asyncio.Task | None = None
        # Forwards run so far.
        self.num_forwards = 0
        # Chunks computed so far (a forward computes one chunk of each prompt in it).
        self.num_chunks = 0

    @property
    def num_waiting(self) -> int:
        """Jobs not finished yet."""
        return len(self._jobs)

    async def run(self, job: PrefillJob) -> None:
        """Runs `job` to its end; raises what stopped it (PrefillStopped, or the forward's error)."""
        if job.is_done:
            return
        done = asyncio.get_running_loop().create_future()
        self._jobs[job] = (next(self._order), done)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        try:
            await done
        finally:
            self._jobs.pop(job, None)

    async def _drive(self) -> None:
        while self._jobs:
            ordered = sorted(self._jobs, key=lambda job: (job.num_remaining, self._jobs[job][0]))
            parts = [(ordered[i], n) for i, n in plan([job.num_remaining for job in ordered], self.budget_tokens,
                                                              self.pack_tokens)]
            try:
                stopped = await asyncio.to_thread(self._step, parts)
            except Exception as exc:
                for job, _ in parts:
                    self._settle(job, exc)
                continue
            self.num_forwards += 1
            self.num_chunks += len(parts) - len(stopped)
            for job, _ in parts:
                if job in stopped:
                    self._settle(job, stopped[job])
                elif job.is_done:
                    self._settle(job, None)

    def _settle(self, job: PrefillJob, error: BaseException | None) -> None:
        entry = self._jobs.pop(job, None)
        if entry is None or entry[1].done():
            return  # its run was cancelled meanwhile
        if error is None:
            entry[1].set_result(None)
        else:
            entry[1].set_exception(error)
