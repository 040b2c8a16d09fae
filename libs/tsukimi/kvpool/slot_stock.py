"""A writer's stock of reserved slots (room for one block each, keys not known yet), per block size: taken by
puts with no put start, filled again in the background once down to half, and given back when not used for
`idle_s` (its own sweep timer) or on close."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from tsukimi.kvpool.carried_work import CarriedWork
from tsukimi.proto import cachestore_pb2 as pb

log = logging.getLogger(__name__)

# Most slots kept in stock per block size, however small the blocks (each is an allocation at the master).
MAX_STOCK = 256


@dataclass(slots=True)
class Slot:
    """Room reserved for one block, to write with no put start."""

    slot_id: int
    # Where to write.
    replica: pb.Replica
    # Local monotonic time after which it is not written (its term from when its reserve was sent, less a margin).
    until: float
    # `PoolSession.epoch` when the master gave it.
    epoch: int


class SlotStock:
    """Block size -> its slots; slots given back become returned slots in `work`. `reserve(size, count)` asks the
    master for up to `count` slots (fewer when it has no room), `spawn` runs a background refill."""

    def __init__(self, work: CarriedWork, reserve: Callable[[int, int], Awaitable[list[Slot]]],
                 spawn: Callable[[Awaitable], object], reserve_bytes: int, idle_s: float):
        self._work = work
        self._reserve = reserve
        self._spawn = spawn
        # Bytes of slots kept per block size.
        self.reserve_bytes = reserve_bytes
        self.idle_s = idle_s
        self.stock: dict[int, list[Slot]] = {}
        # Block size -> when a slot of it was last taken.
        self._used_at: dict[int, float] = {}
        # Block sizes whose stock is being refilled in the background.
        self._refilling: set[int] = set()
        # Block size -> until when no slots are asked for (the last reserve found no room).
        self._no_room_until: dict[int, float] = {}
        # Gives back the stocks not used for `idle_s`, every `idle_s` while there are any.
        self._sweeper: asyncio.TimerHandle | None = None
        self._is_closed = False

    @property
    def num_slots(self) -> int:
        """Slots in stock."""
        return sum(len(stock) for stock in self.stock.values())

    def target(self, size: int) -> int:
        """How many slots of `size` bytes are kept in stock (0: none)."""
        return min(self.reserve_bytes // size, MAX_STOCK)

    async def take(self, sizes: Sequence[int]) -> dict[int, Slot]:
        """Index -> the slot to write it into, for the blocks there is (or can be reserved) stock for."""
        work = self._work
        now = time.monotonic()
        epoch = work.stream()
        taken: dict[int, Slot] = {}
        missing: dict[int, list[int]] = {}  # block size -> indices with no slot yet
        for i, size in enumerate(sizes):
            if size <= 0 or not self.target(size) or self._no_room_until.get(size, 0.0) > now:
                continue
            stock = self.stock.get(size)
            while stock:
                slot = stock.pop()
                if slot.epoch == epoch and slot.until > now:
                    taken[i] = slot
                    break
                # NOTE: one over its term goes back; one of another stream is left to expire (its pool may be gone).
                if work.on_stream(slot.epoch):
                    work.add_returned_slots((slot.slot_id,))
            else:
                missing.setdefault(size, []).append(i)
            self._used_at[size] = now
        try:
            for size, indices in missing.items():
                slots = await self._reserve(size, len(indices) + self.target(size))
                if len(slots) < len(indices):
                    # NOTE: the pool had no room (nothing it could evict): puts of this size take put starts for a
                    # while, rather than a reserve and then a put start each.
                    self._no_room_until[size] = now + self.idle_s
                for i, slot in zip(indices, slots):
                    taken[i] = slot
                self.stock.setdefault(size, []).extend(slots[len(indices):])
        except BaseException:
            for i, slot in taken.items():  # NOTE: not written: back in stock.
                self.stock.setdefault(sizes[i], []).append(slot)
            raise
        for size in {sizes[i] for i in taken}:
            if len(self.stock.get(size, ())) <= self.target(size) // 2 and size not in self._refilling:
                self._refilling.add(size)
                self._spawn(self._refill(size))
        self._arm_sweep()
        return taken

    def give_back(self, size: int) -> None:
        """Gives back the stock of `size` (on the next call)."""
        work = self._work
        # NOTE: listed before they are added: `on_stream` may drop the work of an earlier stream meanwhile.
        work.add_returned_slots([s.slot_id for s in self.stock.pop(size, ()) if work.on_stream(s.epoch)])
        self._used_at.pop(size, None)
        work.arm()

    def close(self) -> None:
        """Stops the sweep and refills, and gives back every stock."""
        self._is_closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for size in list(self.stock):
            self.give_back(size)

    async def _refill(self, size: int) -> None:
        try:
            stock = self.stock.setdefault(size, [])
            wanted = self.target(size) - len(stock)
            if wanted > 0 and not self._is_closed:
                stock.extend(await self._reserve(size, wanted))
        except grpc.aio.AioRpcError as exc:
            log.warning("cache pool: reserving slots failed: %s", exc.code().name)
        finally:
            self._refilling.discard(size)

    def _arm_sweep(self) -> None:
        """Makes sure `_sweep` runs within `idle_s`."""
        if self._sweeper is None and not self._is_closed:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_s, self._sweep)

    def _sweep(self) -> None:
        """Gives back the stocks not taken from for `idle_s`; while any is left, looks again later."""
        self._sweeper = None
        idle_since = time.monotonic() - self.idle_s
        for size in [n for n, used_at in self._used_at.items() if used_at <= idle_since]:
            if size not in self._refilling:
                self.give_back(size)
        if self.stock:
            self._arm_sweep()
