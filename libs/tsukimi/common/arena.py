"""First-fit allocator over one registered region (decode's KV landing arena, a cachestore tier). Pure bookkeeping."""

from __future__ import annotations

import bisect

ALIGN = 64


class ArenaFull(Exception):
    """No free range is large enough."""


class ArenaAllocator:
    """Hands out aligned [offset, offset + size) ranges of an arena of `capacity` bytes; frees coalesce."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        # Free ranges as sorted starts and their sizes.
        self._starts: list[int] = [0]
        self._sizes: dict[int, int] = {0: capacity}
        self._used: dict[int, int] = {}
        # Bytes in free ranges (kept, not summed: the pool master asks per put).
        self.num_free_bytes = capacity

    @property
    def num_allocations(self) -> int:
        return len(self._used)

    def allocate(self, size: int) -> int:
        """Offset of a new range of at least `size` bytes (rounded up to 64); raises ArenaFull."""
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        size = -(-size // ALIGN) * ALIGN
        starts, sizes = self._starts, self._sizes
        for i, start in enumerate(starts):
            free = sizes.pop(start) if sizes[start] >= size else 0
            if free:
                if free > size:
                    # NOTE: the rest of the range keeps its place in the sorted starts (no bisect, no insort).
                    starts[i] = start + size
                    sizes[start + size] = free - size
                else:
                    del starts[i]
                self.num_free_bytes -= size
                self._used[start] = size
                return start
        raise ArenaFull(f"no {size} contiguous bytes free ({self.num_free_bytes} free in all)")

    def free(self, offset: int) -> None:
        """Returns a range; merges it with free neighbours."""
        size = self._used.pop(offset)
        i = bisect.bisect_left(self._starts, offset)
        if i < len(self._starts) and self._starts[i] == offset + size:
            size += self._sizes[self._starts[i]]
            self._remove_free(self._starts[i])
        if i > 0:
            prev = self._starts[i - 1]
            prev_size = self._sizes[prev]
            if prev + prev_size == offset:
                self._remove_free(prev)
                offset, size = prev, prev_size + size
        self._add_free(offset, size)

    def _add_free(self, start: int, size: int) -> None:
        bisect.insort(self._starts, start)
        self._sizes[start] = size
        self.num_free_bytes += size

    def _remove_free(self, start: int) -> None:
        del self._starts[bisect.bisect_left(self._starts, start)]
        self.num_free_bytes -= self._sizes.pop(start)
