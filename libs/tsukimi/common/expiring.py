"""A set whose members expire `ttl_s` after they were added (e.g. ids of cancelled requests)."""

from __future__ import annotations

import time
from collections import OrderedDict


class ExpiringSet:
    """Membership with a time limit; adding and pruning cost O(1) amortised."""

    def __init__(self, ttl_s: float, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._added: OrderedDict[str, float] = OrderedDict()

    def add(self, key: str) -> None:
        """Adds `key` (or renews it)."""
        self._added[key] = self._clock()
        self._added.move_to_end(key)
        self.prune()

    def prune(self) -> None:
        """Forgets members older than the TTL."""
        now = self._clock()
        while self._added:
            key, added = next(iter(self._added.items()))
            if now - added <= self.ttl_s:
                break
            del self._added[key]

    def __contains__(self, key: str) -> bool:
        added = self._added.get(key)
        return added is not None and self._clock() - added <= self.ttl_s

    def __len__(self) -> int:
        self.prune()
        return len(self._added)
