"""The pool's metadata master: which blocks exist, where their replicas live, who is reading them.

Plain class (no I/O): the cachestore service wraps it in gRPC; the data itself moves through the transfer
engine between workers and the instances that contribute memory. Follows Mooncake Store's master:
- a put is two-phase: `put_start` allocates replicas (the block is invisible, and cannot be evicted, while it is
  written), `put_end` makes it visible, `put_revoke` frees the space;
- a `get` takes a lease (default 10 s) that blocks eviction and removal until released or expired;
- a put not ended within `put_timeout_s` (default 60 s: its writer died or hung) is revoked, so its space and its
  key come back;
- room may be reserved ahead in slots (`reserve`: one block's DRAM each, keys not known yet); a slot ended with a
  key (`end_slot`) becomes that block, visible at once; one not ended within `put_timeout_s` goes back;
- each instance's tier keeps its blocks in LRU order; past the high watermark the oldest unleased blocks are
  evicted, moving to the instance's SSD tier when it has one (the caller copies the bytes), else dropped;
- an instance that goes away takes its replicas with it.

Every replica that appears on or leaves a visible block is recorded as a `Change` (`take_changes`): the service
turns them into data movements on the instances (SSD writes, promotions, copies, file deletions) and into the
`BlockStored` / `BlockRemoved` events it publishes, in the order they happened.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from tsukimi.cachestore.lru_index import LruBlockIndex, TierFull
from tsukimi.common.arena import ArenaAllocator, ArenaFull

TIERS = ("dram", "ssd")


def _dram_first(replicas: list[Replica]) -> list[Replica]:
    """A copy of `replicas`, DRAM ones first (most blocks have one replica: no sort)."""
    if len(replicas) == 1:
        return list(replicas)
    return sorted(replicas, key=lambda r: TIERS.index(r.tier))


class PoolError(Exception):
    """A request the pool cannot satisfy (unknown block, no room, leased, ...)."""


class Replica(NamedTuple):
    """Where one copy of a block lives. (Named tuples here: made per block on every put, at half a frozen
    dataclass's cost.)"""

    instance_id: str
    tier: str
    offset: int
    size: int


@dataclass(slots=True)
class Block:
    """One immutable block of KV, keyed by its chained hash."""

    key: bytes
    size: int
    # Checksum the writer computed; readers verify it.
    checksum: str
    replicas: list[Replica]
    # False while being written.
    is_visible: bool = False
    # Lease id -> expiry (monotonic seconds).
    leases: dict[int, float] = field(default_factory=dict)


class Change(NamedTuple):
    """A replica of a visible block appeared (`is_stored`) or went away. A stored replica whose bytes come from
    another replica names it as `source` (demotion to SSD, promotion to DRAM, a raised replica count); the
    instance holding `replica` must copy them before the operation's reply leaves."""

    key: bytes
    replica: Replica
    is_stored: bool
    source: Replica | None = None


class Eviction(NamedTuple):
    """A replica evicted from a tier; `demoted_to` is where its bytes must be copied (SSD), if anywhere."""

    key: bytes
    replica: Replica
    demoted_to: Replica | None


class _Tier:
    def __init__(self, capacity: int, high_watermark: float, evict_share: float):
        self.allocator = ArenaAllocator(capacity)
        self.lru = LruBlockIndex(capacity, high_watermark, evict_share)


class PoolMaster:
    """Metadata of the whole pool."""

    def __init__(self, lease_s: float = 10.0, high_watermark: float = 0.9, evict_share: float = 0.05,
                 clock=time.monotonic, put_timeout_s: float = 60.0):
        self.lease_s = lease_s
        self.put_timeout_s = put_timeout_s
        self._high_watermark = high_watermark
        self._evict_share = evict_share
        self._clock = clock
        self._tiers: dict[tuple[str, str], _Tier] = {}
        # (instance, tier) of every DRAM tier, in the order the instances joined.
        self._dram_tiers: list[tuple[str, _Tier]] = []
        self._blocks: dict[bytes, Block] = {}
        # Blocks with at least one lease: the only ones `_expire` has to look at.
        self._leased: dict[bytes, Block] = {}
        self._lease_ids = itertools.count(1)
        self._changes: list[Change] = []
        self.num_evictions = 0
        # Puts started and not ended -> when they are revoked if still not ended.
        self._writing: dict[bytes, float] = {}
        # Reserved slots: id -> (its DRAM, when it goes back if not ended).
        self._slots: dict[int, tuple[Replica, float]] = {}
        # NOTE: random ids: an id a client got from another pool (a master before this one) is unknown here.
        self._random = random.Random()
        self.num_expired_puts = 0
        # Earliest lease or put deadline that may not have been expired yet.
        self._next_expiry = float("inf")

    # ---- instances ---------------------------------------------------------------------------------------

    def add_instance(self, instance_id: str, dram_bytes: int, ssd_bytes: int = 0,
                     ssd_blocks: list[tuple[bytes, int, str]] = ()) -> list[bytes]:
        """An instance contributes `dram_bytes` (and optionally `ssd_bytes`) to the pool, with the blocks its SSD
        tier already holds as (key, size, checksum); returns the keys of those it could not take (no room, or a
        different size or checksum under the same key), which the instance should delete."""
        self._tiers[(instance_id, "dram")] = _Tier(dram_bytes, self._high_watermark, self._evict_share)
        self._list_dram_tiers()
        if ssd_bytes:
            self._tiers[(instance_id, "ssd")] = _Tier(ssd_bytes, self._high_watermark, self._evict_share)
        rejected = []
        for key, size, checksum in ssd_blocks:
            block = self._blocks.get(key)
            tier = self._tiers.get((instance_id, "ssd"))
            if tier is None or (block is not None and (block.size != size or block.checksum != checksum
                                                       or not block.is_visible)):
                rejected.append(key)
                continue
            offset = self._allocate(instance_id, "ssd", size)
            if offset is None:
                rejected.append(key)
                continue
            if block is None:
                block = self._blocks[key] = Block(key, size, checksum, [], is_visible=True)
            self._add_replica(block, Replica(instance_id, "ssd", offset, size))
        return rejected

    def remove_instance(self, instance_id: str) -> list[bytes]:
        """Drops an instance and its replicas; returns the keys left with no replica (now gone)."""
        for tier in TIERS:
            self._tiers.pop((instance_id, tier), None)
        self._list_dram_tiers()
        lost = []
        for slot_id in [i for i, (r, _) in self._slots.items() if r.instance_id == instance_id]:
            del self._slots[slot_id]
        for key, block in list(self._blocks.items()):
            for replica in [r for r in block.replicas if r.instance_id == instance_id]:
                block.replicas.remove(replica)
                self._record(block, replica, is_stored=False)
            if not block.replicas:
                del self._blocks[key]
                self._leased.pop(key, None)
                self._writing.pop(key, None)
                lost.append(key)
        return lost

    @property
    def num_blocks(self) -> int:
        return sum(1 for b in self._blocks.values() if b.is_visible)

    def dram_used(self) -> int:
        """Bytes of DRAM held by indexed (visible) blocks, all instances."""
        return sum(t.lru.used for (_, tier), t in self._tiers.items() if tier == "dram")

    def tier_usage(self) -> list[tuple[str, str, int, int, int]]:
        """(instance, tier, capacity bytes, used bytes, blocks) of every tier, used counting visible blocks."""
        return [(iid, name, t.allocator.capacity, t.lru.used, len(t.lru))
                for (iid, name), t in sorted(self._tiers.items())]

    def checksum(self, key: bytes) -> str:
        return self._require(key).checksum

    def replicas(self, key: bytes) -> list[Replica]:
        """Replicas of a block (DRAM first); [] when unknown."""
        block = self._blocks.get(key)
        return _dram_first(block.replicas) if block else []

    def size(self, key: bytes) -> int:
        """Bytes of a block; 0 when unknown."""
        block = self._blocks.get(key)
        return block.size if block else 0

    def has_replica(self, key: bytes, replica: Replica) -> bool:
        block = self._blocks.get(key)
        return block is not None and replica in block.replicas

    @property
    def instance_ids(self) -> list[str]:
        return sorted({iid for iid, _ in self._tiers})

    def snapshot(self) -> list[tuple[bytes, str, str]]:
        """(key, instance, tier) of every replica of every visible block."""
        return [(key, r.instance_id, r.tier) for key, block in self._blocks.items() if block.is_visible
                for r in block.replicas]

    def take_changes(self) -> list[Change]:
        """Changes recorded since the last call, oldest first."""
        changes, self._changes = self._changes, []
        return changes

    # ---- lookups -----------------------------------------------------------------------------------------

    def lookup_prefix(self, keys: list[bytes]) -> dict[str, dict[str, int]]:
        """For each instance and tier, how many leading `keys` it holds (visible blocks only)."""
        self._expire()
        result: dict[str, dict[str, int]] = {}
        for iid, tier in self._tiers:
            n = 0
            for key in keys:
                block = self._blocks.get(key)
                if block is None or not block.is_visible or not any(
                        r.instance_id == iid and r.tier == tier for r in block.replicas):
                    break
                n += 1
            result.setdefault(iid, {})[tier] = n
        return result

    def exists(self, key: bytes) -> bool:
        block = self._blocks.get(key)
        return block is not None and block.is_visible

    # ---- two-phase put -----------------------------------------------------------------------------------

    def put_start(self, key: bytes, size: int, checksum: str, num_replicas: int = 1,
                  exclude: tuple[str, ...] = ()) -> tuple[list[Replica], list[Eviction]]:
        """Allocates `num_replicas` DRAM replicas on distinct instances (most free first), evicting LRU blocks
        where needed; returns (replicas to write, evictions made). ([], []) when the block already exists or
        is being written. Raises PoolError when no instance has room."""
        self._expire()
        evictions: list[Eviction] = []
        until = self._deadline(self.put_timeout_s)
        return self._start(key, size, checksum, num_replicas, exclude, evictions, until), evictions

    def put_start_many(self, puts: list[tuple[bytes, int, str, int]]) -> list[list[Replica] | PoolError]:
        """`put_start` of each (key, size, checksum, num_replicas), in order: its replicas, or the PoolError it
        raised (the others go on). A count below 1 means 1."""
        self._expire()
        until = self._deadline(self.put_timeout_s)
        results: list[list[Replica] | PoolError] = []
        evictions: list[Eviction] = []
        for key, size, checksum, num_replicas in puts:
            try:
                results.append(self._start(key, size, checksum, max(1, num_replicas), (), evictions, until))
            except PoolError as exc:
                results.append(exc)
        return results

    def _start(self, key: bytes, size: int, checksum: str, num_replicas: int, exclude: tuple[str, ...],
               evictions: list[Eviction], until: float) -> list[Replica]:
        if key in self._blocks:
            return []
        replicas = []
        for iid in self._dram_candidates(exclude):
            if len(replicas) == num_replicas:
                break
            offset = self._allocate(iid, "dram", size, evictions)
            if offset is not None:
                replicas.append(Replica(iid, "dram", offset, size))
        if not replicas:
            raise PoolError(f"no instance has {size} bytes of DRAM free")
        self._blocks[key] = Block(key, size, checksum, replicas)
        self._writing[key] = until
        return replicas

    # ---- reserved slots -----------------------------------------------------------------------------------

    def reserve(self, size: int, count: int) -> list[tuple[int, Replica]]:
        """Up to `count` slots of `size` bytes of DRAM (on the instances with most free first, evicting LRU blocks
        where needed): (slot id, where to write); fewer when the pool has no more room."""
        self._expire()
        until = self._deadline(self.put_timeout_s)
        evictions: list[Eviction] = []
        slots = []
        for _ in range(count):
            replica = None
            for iid in self._dram_candidates(()):
                offset = self._allocate(iid, "dram", size, evictions)
                if offset is not None:
                    replica = Replica(iid, "dram", offset, size)
                    break
            if replica is None:
                break
            slot_id = self._random.getrandbits(63)
            while slot_id in self._slots or not slot_id:
                slot_id = self._random.getrandbits(63)
            self._slots[slot_id] = (replica, until)
            slots.append((slot_id, replica))
        return slots

    def end_slot(self, slot_id: int, key: bytes, checksum: str) -> int:
        """A slot written whole with `key`'s block: the block becomes visible there. Returns its size; 0 when the
        slot is unknown (returned, over its term, or of another pool), or the key is empty or held already (started
        or visible: that block stays, the slot goes back)."""
        self._expire()
        slot = self._slots.pop(slot_id, None)
        if slot is None:
            return 0
        replica = slot[0]
        if not key or key in self._blocks:
            self._free(replica)
            return 0
        block = self._blocks[key] = Block(key, replica.size, checksum, [replica])
        self._end(block)
        return replica.size

    def return_slot(self, slot_id: int) -> None:
        """A slot not used: its room goes back (an unknown id is ignored)."""
        slot = self._slots.pop(slot_id, None)
        if slot is not None:
            self._free(slot[0])

    @property
    def num_slots(self) -> int:
        """Slots reserved and not ended or returned yet."""
        return len(self._slots)

    def _free(self, replica: Replica) -> None:
        tier = self._tiers.get((replica.instance_id, replica.tier))
        if tier is not None:
            tier.allocator.free(replica.offset)

    def put_end(self, key: bytes) -> list[Eviction]:
        """The block's bytes are written: it becomes visible. Returns the evictions this caused. Raises
        PoolError for a put revoked meanwhile (by its writer, or for its timeout)."""
        self._expire()
        return self._end(self._require(key))

    def put_end_many(self, keys: list[bytes]) -> list[int]:
        """`put_end` of each key, in order: the block's size, or 0 for a put revoked meanwhile (or unknown)."""
        self._expire()
        blocks = self._blocks
        sizes = []
        for key in keys:
            block = blocks.get(key)
            if block is None:
                sizes.append(0)
                continue
            self._end(block)
            sizes.append(block.size)
        return sizes

    def _end(self, block: Block) -> list[Eviction]:
        if block.is_visible:
            return []
        block.is_visible = True
        key = block.key
        self._writing.pop(key, None)
        evictions = []
        for replica in list(block.replicas):
            self._record(block, replica, is_stored=True)
            evictions += self._index(key, replica)
        return evictions

    def put_revoke(self, key: bytes) -> None:
        """Abandons a put that has not ended: frees its space."""
        block = self._require(key)
        if block.is_visible:
            raise PoolError("block is already visible: remove it instead")
        for replica in block.replicas:
            self._tiers[(replica.instance_id, replica.tier)].allocator.free(replica.offset)
        del self._blocks[key]
        self._writing.pop(key, None)

    # ---- reads -------------------------------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[list[Replica], int] | None:
        """Replicas of a visible block (DRAM first) and a lease id; None on a miss."""
        self._expire()
        block = self._blocks.get(key)
        if block is None or not block.is_visible:
            return None
        return _dram_first(block.replicas), self._lease(block, self._deadline(self.lease_s))

    def get_many(self, keys: list[bytes], is_prefix: bool = False) -> list[tuple[list[Replica], int, str] | None]:
        """`get` of each key, in order, with the block's checksum: (replicas, lease id, checksum), None on a miss.
        With `is_prefix`, every key from the first miss on is a miss (not leased)."""
        self._expire()
        until = self._deadline(self.lease_s)
        blocks = self._blocks
        results: list[tuple[list[Replica], int, str] | None] = []
        for key in keys:
            block = blocks.get(key)
            if block is None or not block.is_visible:
                results.append(None)
                if is_prefix:
                    results += [None] * (len(keys) - len(results))
                    break
                continue
            results.append((_dram_first(block.replicas), self._lease(block, until), block.checksum))
        return results

    def _lease(self, block: Block, until: float) -> int:
        """A new lease on a visible block until `until`: pins it where it lives, and counts as an access."""
        lease = next(self._lease_ids)
        is_first_lease = not block.leases
        key = block.key
        for replica in block.replicas:
            lru = self._tiers[(replica.instance_id, replica.tier)].lru
            if is_first_lease:
                lru.pin(key)
            lru.touch(key)
        block.leases[lease] = until
        self._leased[key] = block
        return lease

    def touch(self, keys: list[bytes]) -> tuple[int, int]:
        """Counts reads of blocks a reader still held a lease on (read without a `get`) as accesses; returns how
        many of `keys` are visible blocks, and their bytes (the others are ignored)."""
        blocks, tiers = self._blocks, self._tiers
        num_found = num_bytes = 0
        for key in keys:
            block = blocks.get(key)
            if block is None or not block.is_visible:
                continue
            num_found += 1
            num_bytes += block.size
            for replica in block.replicas:
                tiers[(replica.instance_id, replica.tier)].lru.touch(key)
        return num_found, num_bytes

    def release(self, key: bytes, lease: int) -> None:
        """Ends a lease early."""
        block = self._blocks.get(key)
        if block is not None and block.leases.pop(lease, None) is not None and not block.leases:
            self._unpin(block)
            self._leased.pop(key, None)

    def promote(self, key: bytes) -> Replica | None:
        """Gives an SSD-only visible block a DRAM replica on the instance holding it on SSD (evicting there if
        needed); the change names the SSD replica as its source. Returns the new replica; None when the block
        already is in DRAM, is unknown, or no DRAM could be freed."""
        self._expire()
        block = self._blocks.get(key)
        if block is None or not block.is_visible or any(r.tier == "dram" for r in block.replicas):
            return None
        for source in list(block.replicas):
            if (source.instance_id, "dram") not in self._tiers:
                continue
            ssd = self._tiers[(source.instance_id, "ssd")]
            ssd.lru.pin(key)  # NOTE: the demotions that make room must not evict the very block being promoted.
            try:
                offset = self._allocate(source.instance_id, "dram", block.size, [])
                if offset is None:
                    continue
                replica = Replica(source.instance_id, "dram", offset, block.size)
                self._add_replica(block, replica, source)
                return replica
            finally:
                ssd.lru.unpin(key)
        return None

    def change_replicas(self, key: bytes, num_replicas: int) -> list[Replica]:
        """Raises or lowers how many instances hold the block in DRAM (at least 1): new replicas go to the
        instances with most DRAM free and copy from an existing DRAM replica (their changes name it); extra
        replicas go from the end of the list. Returns the block's DRAM replicas afterwards. Raises PoolError for
        an unknown block, one without a DRAM replica (get it first), or lowering a leased block."""
        self._expire()
        block = self._require(key)
        if not block.is_visible:
            raise PoolError("block is still being written")
        num_replicas = max(1, num_replicas)
        drams = [r for r in block.replicas if r.tier == "dram"]
        if not drams:
            raise PoolError("block has no DRAM replica to copy from")
        if num_replicas < len(drams):
            if block.leases:
                raise PoolError("block is leased to a reader: its replicas cannot be lowered now")
            for replica in drams[num_replicas:]:
                self._drop(block, replica)
        held = {r.instance_id for r in drams}
        for iid in self._dram_candidates(tuple(held)):
            if len([r for r in block.replicas if r.tier == "dram"]) >= num_replicas:
                break
            offset = self._allocate(iid, "dram", block.size, [])
            if offset is not None:
                self._add_replica(block, Replica(iid, "dram", offset, block.size), drams[0])
        return [r for r in block.replicas if r.tier == "dram"]

    def drop_replica(self, key: bytes, replica: Replica) -> None:
        """A replica failed its checksum (or its instance lost it): forget it."""
        block = self._require(key)
        if replica in block.replicas:
            self._drop(block, replica)

    def remove(self, key: bytes) -> bool:
        """Deletes a block unless a reader holds a lease on it; True when removed."""
        self._expire()
        block = self._blocks.get(key)
        if block is None or block.leases or not block.is_visible:
            return False
        for replica in list(block.replicas):
            self._drop(block, replica)
        return True

    # ---- internals ---------------------------------------------------------------------------------------

    def _require(self, key: bytes) -> Block:
        block = self._blocks.get(key)
        if block is None:
            raise PoolError("unknown block")
        return block

    def _deadline(self, seconds: float) -> float:
        """`seconds` from now, as a lease or put deadline that `_expire` will look at."""
        until = self._clock() + seconds
        if until < self._next_expiry:
            self._next_expiry = until
        return until

    def _list_dram_tiers(self) -> None:
        self._dram_tiers = [(iid, t) for (iid, name), t in self._tiers.items() if name == "dram"]

    def _dram_candidates(self, exclude: tuple[str, ...]) -> list[str]:
        """Instances with a DRAM tier, most free bytes first."""
        tiers = self._dram_tiers
        if len(tiers) == 1:
            return [] if tiers[0][0] in exclude else [tiers[0][0]]
        ranked = sorted((t for t in tiers if t[0] not in exclude), key=lambda t: -t[1].allocator.num_free_bytes)
        return [iid for iid, _ in ranked]

    def _record(self, block: Block, replica: Replica, is_stored: bool, source: Replica | None = None) -> None:
        if block.is_visible:
            self._changes.append(Change(block.key, replica, is_stored, source))

    def _add_replica(self, block: Block, replica: Replica, source: Replica | None = None) -> list[Eviction]:
        """Adds a replica to a visible block and indexes it (pinned when the block is leased)."""
        block.replicas.append(replica)
        self._record(block, replica, is_stored=True, source=source)
        evictions = self._index(block.key, replica)
        if block.leases and block.key in self._tiers[(replica.instance_id, replica.tier)].lru:
            self._tiers[(replica.instance_id, replica.tier)].lru.pin(block.key)
        return evictions

    def _drop(self, block: Block, replica: Replica) -> None:
        """Takes a replica out of its block, its tier's index and allocator; the block goes with its last one."""
        block.replicas.remove(replica)
        tier = self._tiers.get((replica.instance_id, replica.tier))
        if tier is not None:
            if block.leases and block.key in tier.lru:
                tier.lru.unpin(block.key)
            tier.lru.remove(block.key)
            tier.allocator.free(replica.offset)
        self._record(block, replica, is_stored=False)
        if not block.replicas:
            del self._blocks[block.key]
            self._leased.pop(block.key, None)
            self._writing.pop(block.key, None)

    def _allocate(self, iid: str, tier_name: str, size: int, evictions: list[Eviction] | None = None
                  ) -> int | None:
        """An offset for `size` bytes in a tier, evicting its oldest unleased blocks while it is full (only
        when `evictions` collects them); None when it cannot make room."""
        tier = self._tiers[(iid, tier_name)]
        while True:
            try:
                return tier.allocator.allocate(size)
            except ArenaFull:
                if evictions is None:
                    return None
                victim = tier.lru.oldest_unpinned()
                if victim is None:
                    return None
                tier.lru.remove(victim)
                evictions += self._evict(victim, iid, tier_name)

    def _index(self, key: bytes, replica: Replica) -> list[Eviction]:
        tier = self._tiers[(replica.instance_id, replica.tier)]
        try:
            evicted = tier.lru.insert(key, replica.size)
        except TierFull:
            evicted = []
        return [e for k in evicted for e in self._evict(k, replica.instance_id, replica.tier)]

    def _evict(self, key: bytes, iid: str, tier_name: str) -> list[Eviction]:
        """Takes `key`'s replica out of a tier (already out of its LRU): DRAM demotes to the instance's SSD tier
        when there is one (which may evict there in turn); SSD drops."""
        self.num_evictions += 1
        block = self._blocks[key]
        replica = next(r for r in block.replicas if r.instance_id == iid and r.tier == tier_name)
        self._tiers[(iid, tier_name)].allocator.free(replica.offset)
        block.replicas.remove(replica)
        self._record(block, replica, is_stored=False)
        demoted, more = None, []
        has_ssd_copy = any(r.instance_id == iid and r.tier == "ssd" for r in block.replicas)
        if tier_name == "dram" and (iid, "ssd") in self._tiers and not has_ssd_copy:
            offset = self._allocate(iid, "ssd", block.size, more)
            if offset is not None:
                demoted = Replica(iid, "ssd", offset, block.size)
                block.replicas.append(demoted)
                self._record(block, demoted, is_stored=True, source=replica)
                more += self._index(key, demoted)  # NOTE: a full SSD may evict this very block again.
        if not block.replicas:
            self._blocks.pop(key, None)
            self._leased.pop(key, None)
        return [Eviction(key, replica, demoted), *more]

    def _unpin(self, block: Block) -> None:
        for replica in block.replicas:
            tier = self._tiers.get((replica.instance_id, replica.tier))
            if tier is not None and block.key in tier.lru:
                tier.lru.unpin(block.key)

    def _expire(self) -> None:
        now = self._clock()
        if now < self._next_expiry:
            return  # NOTE: called on every operation; nothing can have expired before the earliest deadline.
        self._next_expiry = min(min((u for b in self._leased.values() for u in b.leases.values() if u > now),
                                    default=float("inf")),
                                min((u for u in self._writing.values() if u > now), default=float("inf")),
                                min((u for _, u in self._slots.values() if u > now), default=float("inf")))
        for key in [k for k, until in self._writing.items() if until <= now]:
            self.put_revoke(key)
            self.num_expired_puts += 1
        for slot_id in [i for i, (_, until) in self._slots.items() if until <= now]:
            self.return_slot(slot_id)
            self.num_expired_puts += 1
        for key, block in list(self._leased.items()):
            for lease in [lid for lid, until in block.leases.items() if until <= now]:
                del block.leases[lease]
            if not block.leases:
                self._unpin(block)
                del self._leased[key]
