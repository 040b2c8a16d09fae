"""The simulated clock of `tsukimi sim serve`: a heap of (time s, sequence, handler, argument) events, run in order;
ties run in the order they were scheduled, so a run is deterministic. Optionally samples the system's load every
`sample_every_s` seconds (the state in force just before the first event at or after each sample time).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Clock:
    """An event queue plus load samples."""

    def __init__(self, sample_every_s: float = 0.0, sampler: Callable[[], tuple] | None = None):
        self._heap: list = []
        self._seq = 0
        self.now = 0.0
        self.sample_every_s = sample_every_s
        self._sampler = sampler if sample_every_s > 0 else None
        self._next_sample = 0.0
        self._num_samples = 0
        # (time, *sampler()) rows.
        self.samples: list[tuple] = []
        self.num_events = 0

    def at(self, t: float, handler: Callable, arg=None) -> None:
        """Runs `handler(t, arg)` at simulated time `t`."""
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, handler, arg))

    def run(self) -> None:
        heap = self._heap
        pop = heapq.heappop
        sampler = self._sampler
        n = 0
        while heap:
            t, _, handler, arg = pop(heap)
            if sampler is not None and t >= self._next_sample:
                row = sampler()
                while self._next_sample <= t:
                    self.samples.append((self._next_sample, *row))
                    self._num_samples += 1
                    self._next_sample = self._num_samples * self.sample_every_s
            self.now = t
            handler(t, arg)
            n += 1
        self.num_events = n
