"""Which blocks one tier holds, in least-recently-used order. Pure bookkeeping: the pool, the conductor's view
and `tsukimi sim cache` all run this same code.

Eviction starts when use passes the high watermark (default 90% of capacity) and frees a share of the capacity
(default 5%), oldest first; a pinned block (leased to a reader, or being written) is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class TierFull(Exception):
    """A block does not fit even after evicting everything that may be evicted."""


class LruBlockIndex:
    """Block keys with sizes, LRU order, pins; `capacity` None means unbounded."""

    def __init__(self, capacity: int | None, high_watermark: float = 0.9, evict_share: float = 0.05):
        if capacity is not None and capacity <= 0:
            raise ValueError("capacity must be positive (or None for unbounded)")
        if not 0 < high_watermark <= 1 or not 0 < evict_share <= high_watermark:
            raise ValueError("need 0 < evict_share <= high_watermark <= 1")
        self.capacity = capacity
        self.high_watermark = high_watermark
        self.evict_share = evict_share
        self._sizes: OrderedDict[Hashable, int] = OrderedDict()
        self._pins: dict[Hashable, int] = {}
        self.used = 0
        self.num_evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def match_prefix(self, keys: Sequence[Hashable]) -> int:
        """How many leading `keys` are present; those become the most recently used."""
        n = 0
        for key in keys:
            if key not in self._sizes:
                break
            self._sizes.move_to_end(key)
            n += 1
        return n

    def touch(self, key: Hashable) -> None:
        """Makes a present block the most recently used (an absent one is ignored)."""
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def num_leading(self, keys: Sequence[Hashable]) -> int:
        """How many leading `keys` are present, leaving the LRU order alone: a peek (placement asks every
        instance, and only the chosen one reads)."""
        sizes = self._sizes
        n = 0
        for key in keys:
            if key not in sizes:
                break
            n += 1
        return n

    def pin(self, key: Hashable) -> None:
        """Protects a present block from eviction until `unpin`."""
        if key not in self._sizes:
            raise KeyError(key)
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Hashable) -> None:
        count = self._pins.get(key, 0) - 1
        if count < 0:
            raise KeyError(f"{key!r} is not pinned")
        if count:
            self._pins[key] = count
        else:
            del self._pins[key]

    def insert(self, key: Hashable, size: int) -> list[Hashable]:
        """Adds (or refreshes) a block; returns the keys evicted to make room. Raises TierFull."""
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return []
        evicted: list[Hashable] = []
        if self.capacity is not None and self.used + size > self.capacity:
            evicted += self._evict_until(self.capacity - size)
            if self.used + size > self.capacity:
                raise TierFull(f"{size} does not fit: {self.used} of {self.capacity} used, the rest pinned")
        self._sizes[key] = size
        self.used += size
        if self.capacity is not None and self.used > self.high_watermark * self.capacity:
            evicted += self._evict_until(self.used - self.evict_share * self.capacity)
        return evicted

    def remove(self, key: Hashable) -> bool:
        """Drops a block unless pinned; True when it was dropped."""
        if key not in self._sizes or key in self._pins:
            return False
        self.used -= self._sizes.pop(key)
        return True

    def oldest_unpinned(self) -> Hashable | None:
        """The block eviction would take next, or None."""
        return next((key for key in self._sizes if key not in self._pins), None)

    def _evict_until(self, target: float) -> list[Hashable]:
        evicted = []
        for key in list(self._sizes):
            if self.used <= target:
                break
            if key in self._pins:
                continue
            self.used -= self._sizes.pop(key)
            evicted.append(key)
        self.num_evictions += len(evicted)
        return evicted
