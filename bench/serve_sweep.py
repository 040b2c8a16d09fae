"""The rate search of `tsukimi bench serve --sweep`: which load to measure next, and the highest one at which at
least `target` of the requests met both SLOs (effective request capacity >= target). Pure: the caller measures.

Given rates are all measured. Otherwise the search starts at `start`, multiplies by `factor` while the point
passes (divides while it fails) until a passing point lies below a failing one, then bisects that bracket
geometrically until its ends are within `precision` (a ratio) or `max_points` points were measured.
"""

from __future__ import annotations

import math


class RateSearch:
    """Call `next()` for the load to measure (None: done), then `record(load, capacity)` with its result."""

    def __init__(self, target: float = 0.9, *, rates: list[float] | None = None, start: float = 1.0,
                 factor: float = 2.0, precision: float = 1.2, max_points: int = 7, lowest: float = 1e-3,
                 highest: float = 1e3):
        if not 0 < target <= 1:
            raise ValueError("target must be within (0, 1]")
        if factor <= 1 or precision <= 1:
            raise ValueError("factor and precision must be ratios above 1")
        if rates is not None and (not rates or min(rates) <= 0):
            raise ValueError("rates must be positive")
        self.target = target
        self.rates = sorted(rates) if rates is not None else None
        self.start, self.factor, self.precision = start, factor, precision
        self.max_points, self.lowest, self.highest = max_points, lowest, highest
        # (load, capacity) in the order measured.
        self.points: list[tuple[float, float]] = []

    def passes(self, capacity: float) -> bool:
        return capacity >= self.target

    def record(self, load: float, capacity: float) -> None:
        self.points.append((load, capacity))

    def next(self) -> float | None:
        if self.rates is not None:
            return self.rates[len(self.points)] if len(self.points) < len(self.rates) else None
        if len(self.points) >= self.max_points:
            return None
        if not self.points:
            return self.start
        passing = [x for x, c in self.points if self.passes(c)]
        failing = [x for x, c in self.points if not self.passes(c)]
        if not passing:
            load = min(failing) / self.factor
            return load if load >= self.lowest else None
        lo = max(passing)
        above = [x for x in failing if x > lo]
        if not above:
            load = lo * self.factor
            return load if load <= self.highest else None
        hi = min(above)
        if hi / lo <= self.precision:
            return None
        return math.sqrt(lo * hi)

    @property
    def best(self) -> float | None:
        """The highest measured load that passed (None if none did)."""
        passing = [x for x, c in self.points if self.passes(c)]
        return max(passing) if passing else None
