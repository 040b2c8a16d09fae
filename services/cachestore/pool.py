"""The pool master at run time: the metadata (`PoolMaster`), the instances it orders bytes around on
(`Member`s), and the events it publishes. One per cluster, on the elected cachestore.

Every operation runs under one lock and ends by settling its changes: the byte movements the metadata change
implies (SSD writes of demoted blocks, promotions, copies for extra replicas, file deletions) are done before the
operation returns, so no DRAM range is handed out again before its old bytes are safe, and then the changes go
out as `PoolEvents`. A movement that fails drops the replica it was making (nothing half-made is ever served).
Must not import torch.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from tsukimi.cachestore.master import PoolMaster
from tsukimi.cachestore.member import Member, MemberError
from tsukimi.cachestore.records import Change, PoolError, Replica
from tsukimi.common.messages import BlockRemoved, BlockStored, PoolEvents, PoolSnapshot

log = logging.getLogger(__name__)


@dataclass
class Instance:
    """A member of the pool: how to order it around, where its DRAM is."""

    member: Member
    # Its transfer-engine segment and the buffer id of its DRAM there.
    segment: str
    buffer_id: int
    # Random id of the process's run (a new one means a restarted instance).
    boot_id: str = ""


class PutSpec(NamedTuple):
    """One block a client wants to put (a named tuple: `PoolMaster.put_start_many` takes it as it is)."""

    key: bytes
    size: int
    checksum: str
    num_replicas: int = 1


class Pool:
    """Pool operations over the master's metadata; `publish` receives the `PoolEvents`: one message per
    operation, or with `coalesce_s` > 0 one per `coalesce_s` at most, carrying the changes of every operation
    settled meanwhile (fewer messages to encode and send under load; consumers see changes that much later).
    A snapshot first sends what is pending, so its `seq` covers every change it holds."""

    def __init__(self, master: PoolMaster, publish: Callable[[PoolEvents], None] = lambda events: None,
                 coalesce_s: float = 0.0):
        self.master = master
        self.instances: dict[str, Instance] = {}
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self.num_hits = self.num_misses = 0
        self._publish = publish
        self._lock = asyncio.Lock()
        self.coalesce_s = coalesce_s
        # Events settled and not published yet (with `coalesce_s`), and the timer that publishes them.
        self._unpublished: list[BlockStored | BlockRemoved] = []
        self._flusher: asyncio.TimerHandle | None = None

    # ---- membership --------------------------------------------------------------------------------------

    async def join(self, instance_id: str, instance: Instance, dram_bytes: int, ssd_bytes: int) -> int:
        """Adds an instance with what its SSD tier already holds; returns how many SSD blocks the pool took
        (the others are deleted on the instance)."""
        blocks = await instance.member.list_ssd()
        async with self._lock:
            if instance_id in self.instances:
                await self._leave(instance_id)
            self.instances[instance_id] = instance
            rejected = self.master.add_instance(instance_id, dram_bytes, ssd_bytes,
                                                [(b.key, b.size, b.checksum) for b in blocks])
            if rejected:
                try:
                    await instance.member.delete_ssd(rejected)
                except MemberError as exc:
                    log.warning("could not delete %d rejected SSD blocks on %s: %s", len(rejected), instance_id, exc)
            await self._settle()
        return len(blocks) - len(rejected)

    async def leave(self, instance_id: str) -> int:
        """Drops an instance and its replicas; returns how many blocks went with it (no other replica)."""
        async with self._lock:
            return await self._leave(instance_id)

    async def _leave(self, instance_id: str) -> int:
        instance = self.instances.pop(instance_id, None)
        lost = self.master.remove_instance(instance_id)
        await self._settle()
        if instance is not None:
            await instance.member.close()
        return len(lost)

    async def close(self) -> None:
        self.flush_events()
        for instance in self.instances.values():
            await instance.member.close()
        self.instances.clear()

    # ---- operations --------------------------------------------------------------------------------------

    async def lookup(self, keys: list[bytes]) -> dict[str, dict[str, int]]:
        async with self._lock:
            return self.master.lookup_prefix(keys)

    async def exists(self, keys: list[bytes]) -> list[bool]:
        async with self._lock:
            return [self.master.exists(k) for k in keys]

    async def put_start(self, puts: list[PutSpec]) -> list[list[Replica] | PoolError]:
        """DRAM replicas to write, per block ([] when it exists or is being written; a PoolError when no
        instance has room)."""
        async with self._lock:
            results = self.master.put_start_many(puts)
            await self._settle()
            return results

    async def put_end(self, keys: list[bytes]) -> list[int]:
        """Makes written blocks visible; the size of each (0 for one unknown: revoked or lost meanwhile)."""
        async with self._lock:
            sizes = self.master.put_end_many(keys)
            await self._settle()
            return sizes

    async def reserve(self, size: int, count: int) -> list[tuple[int, Replica]]:
        """Slots of `size` bytes for puts whose keys come with their ends (see `PoolMaster.reserve`)."""
        async with self._lock:
            slots = self.master.reserve(size, count)
            await self._settle()
            return slots

    async def end_slots(self, ends: list[tuple[int, bytes, str]]) -> list[int]:
        """(slot id, key, checksum) of written slots: each becomes its key's block; the size of each (0: see
        `PoolMaster.end_slot`)."""
        async with self._lock:
            sizes = [self.master.end_slot(slot_id, key, checksum) for slot_id, key, checksum in ends]
            await self._settle()
            return sizes

    async def return_slots(self, slot_ids: list[int]) -> None:
        async with self._lock:
            for slot_id in slot_ids:
                self.master.return_slot(slot_id)

    async def put_revoke(self, keys: list[bytes]) -> list[bool]:
        async with self._lock:
            done = []
            for key in keys:
                try:
                    self.master.put_revoke(key)
                    done.append(True)
                except PoolError:
                    done.append(False)
            return done

    async def get(self, keys: list[bytes], is_prefix: bool = False) -> list[tuple[list[Replica], int, str] | None]:
        """Per key: (DRAM replicas, lease id, checksum), promoting SSD-only blocks to DRAM first; None on a miss
        (or when no DRAM could be freed for it). With `is_prefix`, the keys after the first miss are misses too
        (not leased: a reader of a prefix cannot use a block after a gap)."""
        async with self._lock:
            # NOTE: every key is leased first, so a promotion below cannot evict a later key of the same batch.
            results = self.master.get_many(keys, is_prefix)
            for i, found in enumerate(results):
                if found is None:
                    if is_prefix:
                        break  # NOTE: the rest are misses, not leased: nothing after a gap is promoted.
                    continue
                if found[0][0].tier != "dram":
                    # SSD only: promoted, then leased again right after, so the next key's promotion cannot
                    # evict it.
                    key = keys[i]
                    self.master.release(key, found[1])
                    self.master.promote(key)
                    await self._settle()
                    again = self.master.get(key)
                    found = results[i] = (again[0], again[1], found[2]) if again is not None else None
                drams = [r for r in found[0] if r.tier == "dram"] if found else []
                if found and not drams:
                    self.master.release(keys[i], found[1])
                if not drams:
                    results[i] = None
                elif len(drams) != len(found[0]):
                    results[i] = (drams, found[1], found[2])
                if is_prefix and results[i] is None:
                    # A block that could not be had in DRAM ends the prefix: the later ones are given back.
                    for j in range(i + 1, len(results)):
                        if results[j] is not None:
                            self.master.release(keys[j], results[j][1])
                            results[j] = None
                    break
            num_hits = sum(1 for r in results if r is not None)
            self.num_hits += num_hits
            self.num_misses += len(keys) - num_hits
            return results

    async def touch(self, keys: list[bytes]) -> tuple[int, int]:
        """Reads of blocks under leases their readers still held: accesses and hits, as gets would be; returns
        how many were visible blocks, and their bytes."""
        async with self._lock:
            num_found, num_bytes = self.master.touch(keys)
            self.num_hits += num_found
            return num_found, num_bytes

    async def release(self, leases: list[tuple[bytes, int]]) -> None:
        async with self._lock:
            for key, lease in leases:
                self.master.release(key, lease)

    async def remove(self, keys: list[bytes]) -> list[bool]:
        async with self._lock:
            removed = [self.master.remove(k) for k in keys]
            await self._settle()
            return removed

    async def drop_replica(self, key: bytes, replica: Replica) -> None:
        async with self._lock:
            try:
                self.master.drop_replica(key, replica)
            except PoolError:
                return  # NOTE: already gone.
            await self._settle()

    async def change_replicas(self, changes: list[tuple[bytes, int]]) -> list[list[Replica] | PoolError]:
        """Per (key, count): the block's DRAM replicas afterwards (an SSD-only block is promoted first)."""
        async with self._lock:
            results: list[list[Replica] | PoolError] = []
            for key, num_replicas in changes:
                try:
                    if self.master.exists(key) and not any(r.tier == "dram" for r in self.master.replicas(key)):
                        self.master.promote(key)
                        await self._settle()
                    self.master.change_replicas(key, num_replicas)
                    await self._settle()
                    results.append([r for r in self.master.replicas(key) if r.tier == "dram"])
                except PoolError as exc:
                    results.append(exc)
            return results

    async def snapshot(self) -> PoolSnapshot:
        async with self._lock:
            self.flush_events()
            return PoolSnapshot(epoch=self.epoch, seq=self.seq, replicas=[
                BlockStored(key, iid, tier) for key, iid, tier in self.master.snapshot()])

    # ---- settling ----------------------------------------------------------------------------------------

    async def _settle(self) -> None:
        """Moves the bytes the recorded changes imply, then publishes them (and the drops failures caused)."""
        while changes := self.master.take_changes():
            await self._move(changes)
            self._unpublished += [
                (BlockStored if c.is_stored else BlockRemoved)(c.key, c.replica.instance_id, c.replica.tier)
                for c in changes]
            if self.coalesce_s <= 0:
                self.flush_events()
            elif self._flusher is None:
                self._flusher = asyncio.get_running_loop().call_later(self.coalesce_s, self.flush_events)

    def flush_events(self) -> None:
        """Publishes the events not published yet, as the next message of the stream."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._unpublished:
            self.seq += 1
            events, self._unpublished = self._unpublished, []
            self._publish(PoolEvents(epoch=self.epoch, seq=self.seq, events=events))

    async def _move(self, changes: list[Change]) -> None:
        # NOTE: order matters: files of dropped SSD replicas go first (room for the demotions), demotions read
        # DRAM ranges before promotions and copies may write over them.
        deletions: dict[str, list[bytes]] = {}
        for c in changes:
            if (not c.is_stored and c.replica.tier == "ssd" and c.replica.instance_id in self.instances
                    and not self.master.has_replica(c.key, c.replica)):
                deletions.setdefault(c.replica.instance_id, []).append(c.key)
        for iid, keys in deletions.items():
            try:
                await self.instances[iid].member.delete_ssd(keys)
            except MemberError as exc:
                log.warning("deleting %d SSD blocks on %s failed: %s", len(keys), iid, exc)
        moves = [c for c in changes if c.is_stored and c.source is not None]
        for c in sorted(moves, key=lambda c: c.replica.tier != "ssd"):
            if self.master.has_replica(c.key, c.replica):
                await self._copy(c)

    async def _copy(self, c: Change) -> None:
        replica, source = c.replica, c.source
        instance = self.instances.get(replica.instance_id)
        try:
            if instance is None:
                raise MemberError(f"instance {replica.instance_id} is not a member")
            if replica.tier == "ssd":
                await instance.member.demote(c.key, source.offset, replica.size, self.master.checksum(c.key))
            elif source.tier == "ssd":
                await instance.member.promote(c.key, replica.offset, replica.size)
            else:
                origin = self.instances.get(source.instance_id)
                if origin is None:
                    raise MemberError(f"instance {source.instance_id} is not a member")
                await instance.member.copy_in(c.key, origin.segment, origin.buffer_id, source.offset,
                                              replica.size, replica.offset)
        except MemberError as exc:
            log.warning("block %s: %s; dropping the %s replica on %s", c.key.hex()[:16], exc, replica.tier,
                        replica.instance_id)
            self.master.drop_replica(c.key, replica)
            if source.tier == "ssd" and self.master.has_replica(c.key, source):
                self.master.drop_replica(c.key, source)  # NOTE: an unreadable SSD copy must not be tried again.
