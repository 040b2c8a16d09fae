"""The leases a `PoolClient` keeps after reading their blocks, to read them again with no call to the master; each
goes back when not read under for `idle_s` (its own sweep timer), when more than `max_held` are held (least
recently read first), or when let go."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

from tsukimi.kvpool.block_keys import BlockKey
from tsukimi.kvpool.carried_work import CarriedWork
from tsukimi.kvpool.terms import usable_until
from tsukimi.proto import cachestore_pb2 as pb


@dataclass(slots=True)
class HeldLease:
    """A lease kept after reading its block."""

    # Where the block was read from (the get's first replica).
    replica: pb.Replica
    checksum: str
    lease_id: int
    # Local monotonic time after which the lease is not used (its term, from when its get was sent, less a margin).
    until: float
    # `PoolSession.epoch` when the master gave it.
    epoch: int
    # Last time a read started under it.
    used_at: float
    # Reads under way under it (it goes back to the master only after the last one).
    num_readers: int = 0
    # Let go while read: the last reader gives it back.
    is_let_go: bool = False


class HeldLeases:
    """Key -> its held lease, least recently read first; leases given back become releases in `work`."""

    def __init__(self, work: CarriedWork, max_held: int, idle_s: float):
        self._work = work
        self.max_held = max_held
        self.idle_s = idle_s
        self.held: OrderedDict[BlockKey, HeldLease] = OrderedDict()
        # Blocks read under held leases so far (no call to the master).
        self.num_reads = 0
        # Lets go of idle leases every `idle_s` while any are held.
        self._sweeper: asyncio.TimerHandle | None = None
        self._is_closed = False

    def __len__(self) -> int:
        return len(self.held)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self.held

    def hold(self, key: BlockKey, got: pb.GetReply, sent_at: float, epoch: int) -> bool:
        """Keeps the lease of a block just read; False when it is not kept (the caller gives it back)."""
        until = usable_until(sent_at, got.lease_s)
        now = time.monotonic()
        if key in self.held or until <= now:
            return False
        self.held[key] = HeldLease(got.replicas[0], got.checksum, got.lease_id, until, epoch, now)
        while len(self.held) > self.max_held:
            self.let_go(next(iter(self.held)))
        self._arm_sweep()
        return True

    def take(self, key: BlockKey, size: int, now: float, epoch: int) -> HeldLease | None:
        """The held lease to read `key` under (marked as being read), if one can be used."""
        held = self.held.get(key)
        if held is None:
            return None
        if held.epoch != epoch or held.until <= now:
            self.let_go(key)
            return None
        if held.replica.size != size:
            return None
        held.num_readers += 1
        held.used_at = now
        self.held.move_to_end(key)
        return held

    def read_over(self, key: BlockKey, held: HeldLease, ok: bool) -> None:
        """A read under a held lease is over: counted for the master when it read the block, else let go."""
        held.num_readers -= 1
        work = self._work
        if ok:
            self.num_reads += 1
            if work.on_stream(held.epoch):
                work.add_held_read(key)
                work.arm()
        elif self.held.get(key) is held:
            self.let_go(key)
        if held.is_let_go and not held.num_readers and work.on_stream(held.epoch):
            work.add_release(key, held.lease_id)
            work.arm()

    def let_go(self, key: BlockKey) -> None:
        """Stops holding `key`'s lease: given back on the next call (by its last reader, if it is being read). A
        lease of an earlier stream is only forgotten: the master on the stream now may be another, whose own lease
        ids it would give back."""
        held = self.held.pop(key)
        if held.num_readers:
            held.is_let_go = True
        elif self._work.on_stream(held.epoch):
            self._work.add_release(key, held.lease_id)
            self._work.arm()

    def let_go_all(self) -> None:
        for key in list(self.held):
            self.let_go(key)

    def close(self) -> None:
        """Stops the sweep (the caller lets go of what is held)."""
        self._is_closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _arm_sweep(self) -> None:
        """Makes sure `_sweep` runs within `idle_s`."""
        if self._sweeper is None and not self._is_closed:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_s, self._sweep)

    def _sweep(self) -> None:
        """Lets go of the leases not read under for `idle_s`; while any is left, looks again later."""
        self._sweeper = None
        idle_since = time.monotonic() - self.idle_s
        held = self.held
        while held:
            key, oldest = next(iter(held.items()))
            if oldest.used_at > idle_since:
                break
            self.let_go(key)
        if held:
            self._arm_sweep()
