"""Which KV blocks of the decode instance are free: a free list over block ids (vLLM's block pool, without
prefix sharing). Thread-safe: prefill's reservations arrive on the event loop while a step grows sequences in the
engine's thread."""

from __future__ import annotations

import threading
from collections import deque


class NoFreeBlocks(Exception):
    """Fewer blocks are free than asked for."""


class BlockManager:
    """Hands out block ids 0..num_blocks-1, lowest first on a fresh manager, freed ones last (FIFO reuse)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("a block manager needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._is_used = [False] * num_blocks
        self._lock = threading.Lock()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """`num_blocks` ids, all or none; raises NoFreeBlocks."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        with self._lock:
            if num_blocks > len(self._free):
                raise NoFreeBlocks(f"{num_blocks} blocks asked, {len(self._free)} of {self.num_blocks} free")
            ids = [self._free.popleft() for _ in range(num_blocks)]
            for i in ids:
                self._is_used[i] = True
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Returns blocks; freeing a block that is not allocated is a bug and raises ValueError (nothing freed)."""
        with self._lock:
            if len(set(block_ids)) != len(block_ids) or not all(
                    0 <= i < self.num_blocks and self._is_used[i] for i in block_ids):
                raise ValueError(f"freeing blocks not allocated: {block_ids}")
            for i in block_ids:
                self._is_used[i] = False
                self._free.append(i)
