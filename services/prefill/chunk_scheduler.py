"""Whose prefill chunks run in the next forward: the prompts in progress on a prefill worker share its one device
a forward at a time, a chunk of at most the engine's chunk size each, the most urgent first. Urgency is the slack
to the request's first-token deadline (arrival + TTFT SLO) once its predicted remaining compute is done: least
slack first, which, unlike shortest-first, does not starve a long prompt that can still make its deadline behind
short ones that have time to spare. A prompt that can no longer make it (negative slack) goes after every other,
so it does not make others late too (the shortest of those first); prompts without a deadline (or without a cost
model to predict them) go shortest first after those with one. Short prompts (at most
`pack_tokens` left) are packed together into one forward up to the chunk size, which saves each its own forward's
fixed cost; a longer prompt runs alone, as its own forward is as efficient and sharing would add attention across
prompts. Without chunking a forward takes one whole prompt. Forwards run in a worker thread; plain asyncio, no bus."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

from tsukimi.common.compute_thread import ComputeThread
from tsukimi.prefill.engine import PrefillJob, PrefillStopped

# (job, tokens to compute) per prompt in one forward -> the jobs that stopped (see `PrefillEngine.step`).
StepFn = Callable[[list[tuple[PrefillJob, int]]], dict[PrefillJob, PrefillStopped]]


def plan(remaining: list[int], budget_tokens: int, pack_tokens: int) -> list[tuple[int, int]]:
    """Which prompts feed the next forward and how many tokens each: (index into `remaining`, tokens) for the
    prompts whose tokens left are `remaining`, most urgent first. The first prompt gets up to `budget_tokens` (all
    it has without chunking, a budget of 0); when it has at most `pack_tokens` left, the next prompts with at most
    that many left join it whole, in order, while they fit in the budget."""
    if not remaining:
        return []
    if budget_tokens <= 0:
        return [(0, remaining[0])]
    parts = [(0, min(remaining[0], budget_tokens))]
    used = parts[0][1]
    if remaining[0] > pack_tokens:
        return parts
    for index, num_left in enumerate(remaining[1:], start=1):
        if num_left <= pack_tokens and used + num_left <= budget_tokens:
            parts.append((index, num_left))
            used += num_left
    return parts


def urgency(num_remaining: int, order: int, slack_s: float | None) -> tuple:
    """Sort key of a prompt in progress (smaller runs first): positive slack (seconds to spare at its deadline
    after its predicted remaining compute), least first; then prompts without a deadline, then those that will
    miss theirs, both fewest tokens left first; ties in arrival `order`."""
    if slack_s is None:
        return (1, 0.0, num_remaining, order)
    if slack_s < 0:
        return (2, 0.0, num_remaining, order)
    return (0, slack_s, 0, order)


class ChunkScheduler:
    """Runs concurrent requests' prefill jobs to their ends, packing their chunks into shared forwards."""

    def __init__(self, step: StepFn, budget_tokens: int, pack_tokens: int = 0,
                 predict_s: Callable[[int, int], float] | None = None, clock: Callable[[], float] = time.time):
        self._step = step
        # Where every forward runs (one thread: one OpenMP team).
        self._compute = ComputeThread("prefill-compute")
        # Prompt tokens per forward; 0: one whole prompt per forward.
        self.budget_tokens = budget_tokens
        # Prompts with at most this many tokens left share forwards; 0: none does.
        self.pack_tokens = pack_tokens
        # (tokens to compute, tokens before them) -> predicted seconds; None: no slack is known (shortest first).
        self._predict_s = predict_s
        # Wall clock the deadlines are on.
        self._clock = clock
        # Jobs in progress -> (arrival order, future its `run` awaits, deadline or None).
        self._jobs: dict[PrefillJob, tuple[int, asyncio.Future, float | None]] = {}
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

    async def run(self, job: PrefillJob, deadline: float | None = None) -> None:
        """Runs `job` to its end, which should come by `deadline` (on the scheduler's clock) when given; raises
        what stopped it (PrefillStopped, or the forward's error)."""
        if job.is_done:
            return
        done = asyncio.get_running_loop().create_future()
        self._jobs[job] = (next(self._order), done, deadline)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        try:
            await done
        finally:
            self._jobs.pop(job, None)

    async def _drive(self) -> None:
        while self._jobs:
            ordered = self._ordered()
            parts = [(ordered[i], n) for i, n in plan([job.num_remaining for job in ordered], self.budget_tokens,
                                                              self.pack_tokens)]
            try:
                stopped = await self._compute.run(self._step, parts)
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

    def _ordered(self) -> list[PrefillJob]:
        now = self._clock()

        def key(job: PrefillJob) -> tuple:
            order, _, deadline = self._jobs[job]
            slack = None
            if deadline is not None and self._predict_s is not None:
                slack = deadline - now - self._predict_s(job.num_remaining, job.num_prefix + job.num_computed)
            return urgency(job.num_remaining, order, slack)

        return sorted(self._jobs, key=key)

    def _settle(self, job: PrefillJob, error: BaseException | None) -> None:
        entry = self._jobs.pop(job, None)
        if entry is None or entry[1].done():
            return  # its run was cancelled meanwhile
        if error is None:
            entry[1].set_result(None)
        else:
            entry[1].set_exception(error)
