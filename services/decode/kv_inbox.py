"""Reservations in the decode worker's KV landing arena: prefill reserves, writes through the transfer engine,
then hands over the task; a reservation whose task never comes, or whose request is cancelled, is freed."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tsukimi.common.expiring import ExpiringSet
from tsukimi.common.arena import ArenaAllocator, ArenaFull


class KVRefused(Exception):
    """A reservation cannot be made (cancelled request, duplicate, arena full)."""


@dataclass
class Reservation:
    """A byte range of the arena held for one request."""

    offset: int
    num_bytes: int
    # Monotonic time it was made.
    since: float


class KVInbox:
    """Who holds which range of the arena."""

    def __init__(self, capacity: int, orphan_ttl_s: float):
        self.allocator = ArenaAllocator(capacity)
        self.orphan_ttl_s = orphan_ttl_s
        self._reservations: dict[str, Reservation] = {}
        self._cancelled = ExpiringSet(orphan_ttl_s)

    @property
    def num_free_bytes(self) -> int:
        return self.allocator.num_free_bytes

    @property
    def num_bytes(self) -> int:
        return self.allocator.capacity - self.allocator.num_free_bytes

    def __len__(self) -> int:
        return len(self._reservations)

    def reserve(self, key: str, num_bytes: int) -> Reservation:
        """Room for `key`'s KV; raises KVRefused."""
        if key in self._cancelled:
            raise KVRefused(f"request {key} was cancelled")
        if key in self._reservations:
            raise KVRefused(f"request {key} already holds a reservation")
        try:
            offset = self.allocator.allocate(num_bytes)
        except ArenaFull as exc:
            raise KVRefused(f"KV arena full: {exc}") from None
        except ValueError as exc:
            raise KVRefused(str(exc)) from None
        reservation = self._reservations[key] = Reservation(offset, num_bytes, time.monotonic())
        return reservation

    def take(self, key: str) -> Reservation | None:
        """`key`'s reservation, now owned by the caller (who must `release` it), or None."""
        return self._reservations.pop(key, None)

    def release(self, reservation: Reservation) -> None:
        """Frees a taken reservation's range."""
        self.allocator.free(reservation.offset)

    def cancel(self, key: str) -> bool:
        """Frees `key`'s reservation and refuses later ones for it; True when something was freed."""
        self._cancelled.add(key)
        reservation = self._reservations.pop(key, None)
        if reservation is None:
            return False
        self.allocator.free(reservation.offset)
        return True

    def sweep(self) -> list[str]:
        """Frees reservations whose task never came within the TTL; returns their keys."""
        now = time.monotonic()
        stale = [k for k, r in self._reservations.items() if now - r.since > self.orphan_ttl_s]
        for key in stale:
            self.allocator.free(self._reservations.pop(key).offset)
        self._cancelled.prune()
        return stale
