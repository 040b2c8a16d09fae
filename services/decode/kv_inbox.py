"""Reservations of the decode worker's KV blocks: prefill reserves blocks, writes a request's KV into them
through the transfer engine, then hands over the task, which takes the blocks, or releases them.

A cancelled request's reservation is not freed at once: prefill's one-sided writes may still be landing in its
blocks, and a block handed to another request must never be written by a late one. It is freed when prefill
releases it (its writes over) or when it has been silent for the TTL.

A reservation lives while its writer does: prefill renews the ones it holds (`renew`, from its `KVRenew`s) and
the sweep frees only those silent for the TTL, counted from the last sign of life (its writer died, or lost
touch). Each reservation has a nonce, the owner tag of its blocks in the write guard (the decode buffer's, see
tsukimi.transfer.write_guard) while it holds them: taken, released or swept, its blocks are cleared there before
they are freed, so a stale writer's later writes into them are refused, whoever owns them next. A swept
reservation's writer may be in the middle of a copy it was allowed (the guard's check-then-copy window): its
blocks are kept from reuse for one more TTL ("cooling") before they are freed."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tsukimi.common.expiring import ExpiringSet
from tsukimi.decode.block_manager import BlockManager, NoFreeBlocks
from tsukimi.transfer.write_guard import WriteGuard


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
    # Its identity: the owner tag of its blocks in the write guard, which writes into them must carry.
    nonce: int
    # Monotonic time of its last sign of life: made, or renewed by its writer.
    last_seen: float
    # The request was cancelled: free on release or TTL, never hand over.
    is_cancelled: bool = False


class KVInbox:
    """Who holds which reserved blocks. `guard`: the write guard of the buffer holding the blocks (one unit per
    block), kept in step with the reservations; `clock`: monotonic seconds."""

    def __init__(self, manager: BlockManager, orphan_ttl_s: float, guard: WriteGuard | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.manager = manager
        self.orphan_ttl_s = orphan_ttl_s
        self.guard = guard
        self._clock = clock
        self._reservations: dict[str, Reservation] = {}
        self._cancelled = ExpiringSet(orphan_ttl_s)
        # Blocks of swept reservations, cleared in the guard, not yet freed: (monotonic time swept, block ids).
        self._cooling: list[tuple[float, list[int]]] = []
        # NOTE: from a random start, so a restarted worker does not hand out the nonces of its earlier life.
        self._nonces = itertools.count(secrets.randbits(62) + 1)

    @property
    def num_blocks(self) -> int:
        """Blocks held by reservations (and by swept ones cooling)."""
        return (sum(len(r.block_ids) for r in self._reservations.values())
                + sum(len(block_ids) for _, block_ids in self._cooling))

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
        reservation = self._reservations[key] = Reservation(block_ids, next(self._nonces), self._clock())
        if self.guard is not None:
            self.guard.assign(block_ids, reservation.nonce)
        return reservation

    def renew(self, keys: Iterable[str]) -> int:
        """Its writer is alive: `keys`' reservations are not orphans (their TTL starts again); returns how many of
        them are held (the others were never made here, or are gone)."""
        now = self._clock()
        num_renewed = 0
        for key in keys:
            reservation = self._reservations.get(key)
            if reservation is not None:
                reservation.last_seen = now
                num_renewed += 1
        return num_renewed

    def take(self, key: str) -> Reservation | None:
        """`key`'s reservation, now owned by the caller (who frees its blocks), or None (never reserved, expired
        or cancelled: a cancelled one is freed here, its writes being over once its task is sent)."""
        reservation = self._reservations.pop(key, None)
        if reservation is None:
            return None
        self._disown(reservation)
        if reservation.is_cancelled:
            self.manager.free(reservation.block_ids)
            return None
        return reservation

    def release(self, key: str) -> bool:
        """Frees `key`'s reservation (prefill will not hand it over); True when something was freed."""
        reservation = self._reservations.pop(key, None)
        if reservation is None:
            return False
        self._free(reservation)
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
        """Ends reservations silent for longer than the TTL (no task, release or renewal): their blocks refuse
        writes at once and are freed a TTL later; frees those that have cooled so. Returns the keys ended."""
        now = self._clock()
        while self._cooling and now - self._cooling[0][0] > self.orphan_ttl_s:
            self.manager.free(self._cooling.pop(0)[1])
        stale = [k for k, r in self._reservations.items() if now - r.last_seen > self.orphan_ttl_s]
        for key in stale:
            reservation = self._reservations.pop(key)
            self._disown(reservation)
            self._cooling.append((now, reservation.block_ids))
        self._cancelled.prune()
        return stale

    def _disown(self, reservation: Reservation) -> None:
        """No more writes into `reservation`'s blocks: the guard refuses them from now on."""
        if self.guard is not None:
            self.guard.clear(reservation.block_ids)

    def _free(self, reservation: Reservation) -> None:
        self._disown(reservation)
        self.manager.free(reservation.block_ids)
