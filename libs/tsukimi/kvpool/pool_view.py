"""A consumer's mirror of the KV cache pool's index, kept from the master's `PoolEvents` stream.

Pure (no I/O): the caller subscribes to the events, feeds them to `apply`, and when it answers False fetches a
`PoolSnapshot` and hands it to `load`. The conductor asks it how many leading blocks of a prompt each
cachestore instance holds, per tier, to place requests next to their cached prefix.
"""

from __future__ import annotations

import bisect
import itertools
import operator

from tsukimi.common.messages import BlockRemoved, BlockStored, PoolEvents, PoolSnapshot
from tsukimi.kvpool.block_keys import BlockKey

Holder = tuple[str, str]


class PoolView:
    """Which (instance, tier) holds a replica of which block, as of `seq` of the master's stream `epoch`.

    Events of a stream apply in order: a duplicate or older message is ignored; a gap, another epoch, or any
    message before the first `load` makes the view need a resync. While it does, queries answer from the last
    state it had, and the messages it receives are buffered (at most `max_buffered`; on overflow the buffer is
    dropped and restarts with the newest message) so that `load` can replay those newer than the snapshot.
    """

    def __init__(self, max_buffered: int = 10_000):
        self.max_buffered = max_buffered
        # Stream whose state the view holds; None before the first `load`.
        self.epoch: str | None = None
        # Last message of `epoch` applied (or included in the snapshot loaded).
        self.seq = 0
        self._needs_resync = True
        self._buffered: list[PoolEvents] = []
        self._holders: dict[BlockKey, set[Holder]] = {}
        self._keys_by_instance: dict[str, set[BlockKey]] = {}
        # The same holders as a bit mask per key (one bit per holder ever seen): prefix matching walks a long
        # prompt's keys with one AND each.
        self._masks: dict[BlockKey, int] = {}
        self._bits: dict[Holder, int] = {}
        self._holder_of_bit: list[Holder] = []

    @property
    def needs_resync(self) -> bool:
        """True until a snapshot is loaded, and after a gap or a new epoch until one is."""
        return self._needs_resync

    @property
    def num_buffered(self) -> int:
        """Messages kept for the next `load`."""
        return len(self._buffered)

    @property
    def num_blocks(self) -> int:
        """Distinct keys with at least one replica."""
        return len(self._holders)

    # ---- stream --------------------------------------------------------------------------------------

    def apply(self, message: PoolEvents) -> bool:
        """Applies the next message of the stream; True when the view is in sync afterwards (the message was
        applied, or was a duplicate or older one and ignored). False, applying nothing, when the view needs a
        resync: not loaded yet, a gap, another epoch, or a resync already pending; the message is buffered."""
        if not self._needs_resync and message.epoch == self.epoch:
            if message.seq <= self.seq:
                return True
            if message.seq == self.seq + 1:
                self._apply_events(message)
                return True
        self._needs_resync = True
        self._buffer(message)
        return False

    def load(self, snapshot: PoolSnapshot) -> None:
        """Replaces the whole index with `snapshot`, then replays the buffered messages of its epoch newer
        than it, in order, while they are contiguous. A gap left after them keeps the view needing a resync
        (the messages past the gap stay buffered); otherwise it is in sync and the buffer is emptied."""
        self._holders.clear()
        self._keys_by_instance.clear()
        self._masks.clear()
        for replica in snapshot.replicas:
            self._store(replica.key, replica.instance_id, replica.tier)
        self.epoch = snapshot.epoch
        self.seq = snapshot.seq
        self._needs_resync = False
        pending = sorted((m for m in self._buffered if m.epoch == self.epoch and m.seq > self.seq),
                         key=lambda m: m.seq)
        for i, message in enumerate(pending):
            if message.seq <= self.seq:
                continue
            if message.seq != self.seq + 1:
                self._needs_resync = True
                self._buffered = pending[i:]
                return
            self._apply_events(message)
        self._buffered = []

    # ---- queries -------------------------------------------------------------------------------------

    def num_leading(self, keys: list[BlockKey]) -> dict[str, dict[str, int]]:
        """For each instance and tier, how many leading `keys` it holds (the shape of the master's
        `lookup_prefix`); tiers holding none of them, starting from the first, are left out."""
        if not keys:
            return {}
        masks = self._masks
        # Running AND of the keys' holder masks: holders still matching after each key. Bits are only ever
        # cleared along it, so it never increases and each distinct value's last index is found by bisection.
        alive = list(itertools.accumulate([masks.get(k, 0) for k in keys], operator.and_))
        dropped: dict[int, int] = {}  # bit mask of holders -> number of leading keys they hold
        i, n = 0, len(alive)
        while i < n and alive[i]:
            value = alive[i]
            end = bisect.bisect_right(alive, -value, lo=i, key=operator.neg)
            following = alive[end] if end < n else 0
            dropped[value & ~following] = end
            i = end
        result: dict[str, dict[str, int]] = {}
        for mask, n in dropped.items():
            bit = 0
            while mask:
                if mask & 1:
                    instance_id, tier = self._holder_of_bit[bit]
                    result.setdefault(instance_id, {})[tier] = n
                mask >>= 1
                bit += 1
        return result

    def holders(self, key: BlockKey) -> set[Holder]:
        """(instance, tier) of every replica of `key`; empty when it has none."""
        return set(self._holders.get(key, ()))

    def forget_instance(self, instance_id: str) -> None:
        """Drops every replica of an instance (its heartbeat expired); the stream position does not change."""
        for key in self._keys_by_instance.pop(instance_id, ()):
            holders = self._holders[key]
            gone = [h for h in holders if h[0] == instance_id]
            holders.difference_update(gone)
            for holder in gone:
                self._masks[key] &= ~(1 << self._bits[holder])
            if not holders:
                del self._holders[key]
                del self._masks[key]

    # ---- internals -----------------------------------------------------------------------------------

    def _buffer(self, message: PoolEvents) -> None:
        if len(self._buffered) >= self.max_buffered:
            self._buffered.clear()
        self._buffered.append(message)

    def _apply_events(self, message: PoolEvents) -> None:
        for event in message.events:
            if isinstance(event, BlockStored):
                self._store(event.key, event.instance_id, event.tier)
            elif isinstance(event, BlockRemoved):
                self._remove(event.key, event.instance_id, event.tier)
        self.seq = message.seq

    def _bit(self, holder: Holder) -> int:
        bit = self._bits.get(holder)
        if bit is None:
            bit = self._bits[holder] = len(self._holder_of_bit)
            self._holder_of_bit.append(holder)
        return bit

    def _store(self, key: BlockKey, instance_id: str, tier: str) -> None:
        self._holders.setdefault(key, set()).add((instance_id, tier))
        self._keys_by_instance.setdefault(instance_id, set()).add(key)
        self._masks[key] = self._masks.get(key, 0) | (1 << self._bit((instance_id, tier)))

    def _remove(self, key: BlockKey, instance_id: str, tier: str) -> None:
        holders = self._holders.get(key)
        if holders is None or (instance_id, tier) not in holders:
            return
        holders.discard((instance_id, tier))
        self._masks[key] &= ~(1 << self._bits[(instance_id, tier)])
        if not holders:
            del self._holders[key]
            del self._masks[key]
        if not any(h[0] == instance_id for h in holders):
            keys = self._keys_by_instance[instance_id]
            keys.discard(key)
            if not keys:
                del self._keys_by_instance[instance_id]
