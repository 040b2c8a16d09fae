"""The pool's metadata master: which blocks exist, where their replicas live, who is reading them.

Plain class (no I/O) over a `BlockTable` (block_table.py: tiers, LRU eviction, the change log): the cachestore
service wraps it in gRPC; the data itself moves through the transfer engine between workers and the instances
that contribute memory. Follows Mooncake Store's master:
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

from tsukimi.cachestore.block_table import BlockTable, Tier
from tsukimi.cachestore.records import TIERS, Block, Eviction, PoolError, Replica, dram_first


class PoolMaster(BlockTable):
    """Metadata of the whole pool: the protocol (puts, slots, leases, their deadlines) over its `BlockTable`."""

    def __init__(self, lease_s: float = 10.0, high_watermark: float = 0.9, evict_share: float = 0.05,
                 clock=time.monotonic, put_timeout_s: float = 60.0):
        super().__init__(high_watermark, evict_share)
        self.lease_s = lease_s
        self.put_timeout_s = put_timeout_s
        self._clock = clock
        self._lease_ids = itertools.count(1)
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
        self._tiers[(instance_id, "dram")] = Tier(dram_bytes, self._high_watermark, self._evict_share)
        self._list_dram_tiers()
        if ssd_bytes:
            self._tiers[(instance_id, "ssd")] = Tier(ssd_bytes, self._high_watermark, self._evict_share)
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
        return dram_first(block.replicas), self._lease(block, self._deadline(self.lease_s))

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
            results.append((dram_first(block.replicas), self._lease(block, until), block.checksum))
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

    def _deadline(self, seconds: float) -> float:
        """`seconds` from now, as a lease or put deadline that `_expire` will look at."""
        until = self._clock() + seconds
        if until < self._next_expiry:
            self._next_expiry = until
        return until

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
