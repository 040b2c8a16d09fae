"""The pool's blocks and where their replicas live: the instances' tiers, their LRU eviction, the change log.

The storage half of the pool's metadata master (no I/O): `BlockTable` allocates replicas on the instances' DRAM
and SSD tiers, evicts a full tier's oldest unleased blocks (DRAM demoting to the instance's SSD tier when it has
one), and records every replica that appears on or leaves a visible block as a `Change`. `PoolMaster`
(master.py) builds the protocol on it: two-phase puts, reserved slots, leases and their deadlines.
"""

from __future__ import annotations

from tsukimi.cachestore.lru_index import LruBlockIndex, TierFull
from tsukimi.cachestore.records import Block, Change, Eviction, PoolError, Replica, dram_first
from tsukimi.common.arena import ArenaAllocator, ArenaFull


class Tier:
    """One instance's DRAM or SSD: where its bytes go (allocator) and its blocks in LRU order."""

    def __init__(self, capacity: int, high_watermark: float, evict_share: float):
        self.allocator = ArenaAllocator(capacity)
        self.lru = LruBlockIndex(capacity, high_watermark, evict_share)


class BlockTable:
    """Blocks by key and the tiers holding their replicas; PoolMaster's base."""

    def __init__(self, high_watermark: float, evict_share: float):
        self._high_watermark = high_watermark
        self._evict_share = evict_share
        self._tiers: dict[tuple[str, str], Tier] = {}
        # (instance, tier) of every DRAM tier, in the order the instances joined.
        self._dram_tiers: list[tuple[str, Tier]] = []
        self._blocks: dict[bytes, Block] = {}
        # NOTE: `_leased` and `_writing` are PoolMaster's indexes; they live here because a block forgotten here
        # (its last replica dropped or evicted) leaves them too.
        # Blocks with at least one lease: the only ones `_expire` has to look at.
        self._leased: dict[bytes, Block] = {}
        # Puts started and not ended -> when they are revoked if still not ended.
        self._writing: dict[bytes, float] = {}
        self._changes: list[Change] = []
        self.num_evictions = 0

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
        return dram_first(block.replicas) if block else []

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

    def exists(self, key: bytes) -> bool:
        block = self._blocks.get(key)
        return block is not None and block.is_visible

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

    def _require(self, key: bytes) -> Block:
        block = self._blocks.get(key)
        if block is None:
            raise PoolError("unknown block")
        return block

    def _list_dram_tiers(self) -> None:
        self._dram_tiers = [(iid, t) for (iid, name), t in self._tiers.items() if name == "dram"]

    def _dram_candidates(self, exclude: tuple[str, ...]) -> list[str]:
        """Instances with a DRAM tier, most free bytes first."""
        tiers = self._dram_tiers
        if len(tiers) == 1:
            return [] if tiers[0][0] in exclude else [tiers[0][0]]
        ranked = sorted((t for t in tiers if t[0] not in exclude), key=lambda t: -t[1].allocator.num_free_bytes)
        return [iid for iid, _ in ranked]

    def _free(self, replica: Replica) -> None:
        tier = self._tiers.get((replica.instance_id, replica.tier))
        if tier is not None:
            tier.allocator.free(replica.offset)

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
