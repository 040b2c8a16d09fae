"""Reservations of the decode worker's KV blocks: prefill reserves blocks, writes a request's KV into them
through the transfer engine, then hands over the task, which takes the blocks, or releases them.

A cancelled request's reservation is not freed at once: prefill's one-sided writes may still be landing in its
blocks, and a block handed to another request must never be written by a late one. It is freed when prefill
releases it (its writes over) or when its TTL passes."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tsukimi.common.expiring import ExpiringSet
from tsukimi.decode.block_manager import BlockManager, NoFreeBlocks


class KVRefused(Exception):
    """A reservation cannot be made (cancelled request, duplicate, no free blocks)."""

    def __init__(self, message: str, is_full: bool = False):
        super().__init__(message)
        # True when only free blocks were missing (asking again later may succeed).
        self.is_full = is_full


@dataclass
class Reservation:
    """Blocks held for one request whose KV is being written."""

    block_ids: list[int]
    # Monotonic time it was made.
    since: float
    # The request was cancelled: free on release or TTL, never hand over.
    is_cancelled: bool = False


class KVInbox:
    """Who holds which reserved blocks."""

    def __init__(self, manager: BlockManager, orphan_ttl_s: float):
        self.manager = manager
        self.orphan_ttl_s = orphan_ttl_s
        self._reservations: dict[str, Reservation] = {}
        self._cancelled = ExpiringSet(orphan_ttl_s)

    @property
    def num_blocks(self) -> int:
        """Blocks held by reservations."""
        return sum(len(r.block_ids) for r in self._reservations.values())

    def __len__(self) -> int:
        return len(self._reservations)

    def reserve(self, key: str, num_blocks: int) -> Reservation:
        """`num_blocks` blocks for `key`'s KV; raises KVRefused."""
        if key in self._cancelled:
            raise KVRefused(f"request {key} was cancelled")
        if key in self._reservations:
            raise KVRefused(f"request {key} already holds a reservation")
        if num_blocks < 1:
            raise KVRefused(f"cannot reserve {num_blocks} blocks")
        if num_blocks > self.manager.num_blocks:
            raise KVRefused(f"{num_blocks} blocks asked, the instance has {self.manager.num_blocks}")
        try:
            block_ids = self.manager.allocate(num_blocks)
        except NoFreeBlocks as exc:
            raise KVRefused(f"KV blocks all in use: {exc}", is_full=True) from None
        reservation = self._reservations[key] = Reservation(block_ids, time.monotonic())
        return reservation

    def take(self, key: str) -> Reservation | None:
        """`key`'s reservation, now owned by the caller (who frees its blocks), or None (never reserved, expired
        or cancelled: a cancelled one is freed here, its writes being over once its task is sent)."""
        reservation = self._reservations.pop(key, None)
        if reservation is not None and reservation.is_cancelled:
            self.manager.free(reservation.block_ids)
            return None
        return reservation

    def release(self, key: str) -> bool:
        """Frees `key`'s reservation (prefill will not hand it over); True when something was freed."""
        reservation = self._reservations.pop(key, None)
        if reservation is None:
            return False
        self.manager.free(reservation.block_ids)
        return True

    def cancel(self, key: str) -> bool:
        """Refuses later reservations for `key` and marks its reservation cancelled (freed on release or TTL);
        True when it held one."""
        self._cancelled.add(key)
        reservation = self._reservations.get(key)
        if reservation is None:
            return False
        reservation.is_cancelled = True
        return True

    def sweep(self) -> list[str]:
        """Frees reservations whose task never came within the TTL; returns their keys."""
        now = time.monotonic()
        stale = [k for k, r in self._reservations.items() if now - r.since > self.orphan_ttl_s]
        for key in stale:
            self.manager.free(self._reservations.pop(key).block_ids)
        self._cancelled.prune()
        return stale
