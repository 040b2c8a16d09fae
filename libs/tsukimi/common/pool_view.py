"""A consumer's mirror of the KV cache pool's index, kept from the master's `PoolEvents` stream.

Pure (no I/O): the caller subscribes to the events, feeds them to `apply`, and when it answers False fetches a
`PoolSnapshot` and hands it to `load`. The conductor asks it how many leading blocks of a prompt each
cachestore instance holds, per tier, to place requests next to their cached prefix.
"""

from __future__ import annotations

from tsukimi.common.messages import BlockRemoved, BlockStored, PoolEvents, PoolSnapshot

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
        self._holders: dict[bytes, set[Holder]] = {}
        self._keys_by_instance: dict[str, set[bytes]] = {}

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

    def num_leading(self, keys: list[bytes]) -> dict[str, dict[str, int]]:
        """For each instance and tier, how many leading `keys` it holds (the shape of the master's
        `lookup_prefix`); tiers holding none of them, starting from the first, are left out."""
        if not keys:
            return {}
        counts = dict.fromkeys(self._holders.get(keys[0], ()), 1)
        candidates = set(counts)
        for key in keys[1:]:
            candidates &= self._holders.get(key, set())
            if not candidates:
                break
            for holder in candidates:
                counts[holder] += 1
        result: dict[str, dict[str, int]] = {}
        for (instance_id, tier), n in counts.items():
            result.setdefault(instance_id, {})[tier] = n
        return result

    def holders(self, key: bytes) -> set[Holder]:
        """(instance, tier) of every replica of `key`; empty when it has none."""
        return set(self._holders.get(key, ()))

    def forget_instance(self, instance_id: str) -> None:
        """Drops every replica of an instance (its heartbeat expired); the stream position does not change."""
        for key in self._keys_by_instance.pop(instance_id, ()):
            holders = self._holders[key]
            holders.difference_update([h for h in holders if h[0] == instance_id])
            if not holders:
                del self._holders[key]

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

    def _store(self, key: bytes, instance_id: str, tier: str) -> None:
        self._holders.setdefault(key, set()).add((instance_id, tier))
        self._keys_by_instance.setdefault(instance_id, set()).add(key)

    def _remove(self, key: bytes, instance_id: str, tier: str) -> None:
        holders = self._holders.get(key)
        if holders is None or (instance_id, tier) not in holders:
            return
        holders.discard((instance_id, tier))
        if not holders:
            del self._holders[key]
        if not any(h[0] == instance_id for h in holders):
            keys = self._keys_by_instance[instance_id]
            keys.discard(key)
            if not keys:
                del self._keys_by_instance[instance_id]
