"""Whose prefill chunk runs next: the prompts in progress on a prefill worker take turns on its one device, a
chunk at a time, the one with the fewest tokens left first (so a short prompt is not held behind a long one's
whole length; ties in arrival order). Runs each chunk in a worker thread; plain asyncio, no bus."""

from __future__ import annotations

import asyncio
import heapq
import itertools

from tsukimi.prefill.engine import PrefillJob


class ChunkScheduler:
    """Serialises `PrefillJob.step` calls of concurrent requests, shortest remaining first."""

    def __init__(self) -> None:
        self._waiting: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()
        self._is_busy = False
        # Chunks run so far.
        self.num_chunks = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def run(self, job: PrefillJob) -> None:
        """Runs `job` to its end, one chunk per turn; raises what its step raises (e.g. PrefillStopped)."""
        while not job.is_done:
            await self._turn(job.num_remaining)
            try:
                await asyncio.to_thread(job.step)
                self.num_chunks += 1
            finally:
                self._is_busy = False
                self._grant()

    async def _turn(self, num_remaining: int) -> None:
        granted = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (num_remaining, next(self._order), granted))
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._is_busy = False  # granted, then cancelled before running: pass the turn on
                self._grant()
            raise

    def _grant(self) -> None:
        while not self._is_busy and self._waiting:
            _, _, granted = heapq.heappop(self._waiting)
            if not granted.done():
                self._is_busy = True
                granted.set_result(None)
