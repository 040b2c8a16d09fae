"""The cachestore's gRPC API (`libs/tsukimi/proto/cachestore.proto`) over the pool master."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import Counter, Gauge

from tsukimi.cachestore.master import PoolError, PoolMaster, Replica
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HITS = Counter("tsukimi_cachestore_hits_total", "Block gets that found the block")
MISSES = Counter("tsukimi_cachestore_misses_total", "Block gets that did not")
EVICTIONS = Counter("tsukimi_cachestore_evictions_total", "Replicas evicted, by what happened", ["outcome"])
PUTS = Counter("tsukimi_cachestore_puts_total", "Two-phase puts by outcome", ["outcome"])
DRAM_USED = Gauge("tsukimi_cachestore_dram_used_bytes", "DRAM bytes held by visible blocks")


class CacheStoreServicer(pb_grpc.CacheStoreServicer):
    """Answers metadata calls; `segments` maps instance id -> (segment name, DRAM buffer id)."""

    def __init__(self, master: PoolMaster, segments: dict[str, tuple[str, int]], dram_capacity: int):
        self.master = master
        self.segments = segments
        self.dram_capacity = dram_capacity
        self.num_hits = self.num_misses = self.num_evictions = 0

    def _replica(self, r: Replica) -> pb.Replica:
        segment, buffer_id = self.segments[r.instance_id]
        return pb.Replica(instance_id=r.instance_id, segment=segment, buffer_id=buffer_id, tier=r.tier,
                          offset=r.offset, size=r.size)

    def _count_evictions(self, evictions) -> None:
        for e in evictions:
            EVICTIONS.labels("demoted" if e.demoted_to else "dropped").inc()
        self.num_evictions += len(evictions)

    async def Lookup(self, request, context):
        counts = self.master.lookup_prefix(list(request.keys))
        reply = pb.LookupReply(num_leading=max((n for tiers in counts.values() for n in tiers.values()),
                                               default=0))
        for iid, tiers in counts.items():
            for tier, n in tiers.items():
                reply.counts.append(pb.TierCount(instance_id=iid, tier=tier, num_blocks=n))
        return reply

    async def PutStart(self, request, context):
        if not request.key or request.size <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "key and a positive size are required")
        try:
            replicas, evictions = self.master.put_start(request.key, request.size, request.checksum,
                                                        max(1, request.num_replicas))
        except PoolError as exc:
            PUTS.labels("no_room").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        self._count_evictions(evictions)
        return pb.PutStartReply(replicas=[self._replica(r) for r in replicas])

    async def PutEnd(self, request, context):
        try:
            self._count_evictions(self.master.put_end(request.key))
        except PoolError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        PUTS.labels("visible").inc()
        self._export()
        return pb.Empty()

    async def PutRevoke(self, request, context):
        try:
            self.master.put_revoke(request.key)
        except PoolError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        PUTS.labels("revoked").inc()
        return pb.Empty()

    async def Get(self, request, context):
        found = self.master.get(request.key)
        if found is None:
            self.num_misses += 1
            MISSES.inc()
            return pb.GetReply(found=False)
        replicas, lease = found
        self.num_hits += 1
        HITS.inc()
        return pb.GetReply(found=True, replicas=[self._replica(r) for r in replicas], lease_id=lease,
                           checksum=self.master.checksum(request.key))

    async def Release(self, request, context):
        self.master.release(request.key, request.lease_id)
        return pb.Empty()

    async def Remove(self, request, context):
        removed = self.master.remove(request.key)
        self._export()
        return pb.RemoveReply(removed=removed)

    async def DropReplica(self, request, context):
        r = request.replica
        try:
            self.master.drop_replica(request.key, Replica(r.instance_id, r.tier, r.offset, r.size))
        except PoolError:
            pass  # NOTE: already gone.
        EVICTIONS.labels("bad_replica").inc()
        self._export()
        return pb.Empty()

    async def Stats(self, request, context):
        return pb.StatsReply(num_blocks=self.master.num_blocks, dram_capacity=self.dram_capacity,
                             dram_used=self.master.dram_used(), hits=self.num_hits, misses=self.num_misses,
                             evictions=self.num_evictions)

    def _export(self) -> None:
        DRAM_USED.set(self.master.dram_used())

    # ---- batch forms -------------------------------------------------------------------------------------

    async def BatchPutStart(self, request, context):
        reply = pb.BatchPutStartReply()
        for put in request.puts:
            try:
                replicas, evictions = self.master.put_start(put.key, put.size, put.checksum,
                                                            max(1, put.num_replicas))
                self._count_evictions(evictions)
            except PoolError:
                PUTS.labels("no_room").inc()
                replicas = []
            reply.puts.append(pb.PutStartReply(replicas=[self._replica(r) for r in replicas]))
        return reply

    async def BatchPutEnd(self, request, context):
        for key in request.keys:
            try:
                self._count_evictions(self.master.put_end(key))
                PUTS.labels("visible").inc()
            except PoolError:
                pass  # NOTE: revoked or lost meanwhile; the caller's other blocks still count.
        self._export()
        return pb.Empty()

    async def BatchPutRevoke(self, request, context):
        for key in request.keys:
            try:
                self.master.put_revoke(key)
                PUTS.labels("revoked").inc()
            except PoolError:
                pass
        return pb.Empty()

    async def BatchGet(self, request, context):
        return pb.BatchGetReply(gets=[await self.Get(pb.KeyRequest(key=k), context) for k in request.keys])

    async def BatchRelease(self, request, context):
        for release in request.releases:
            self.master.release(release.key, release.lease_id)
        return pb.Empty()

    async def BatchRemove(self, request, context):
        removed = [self.master.remove(k) for k in request.keys]
        self._export()
        return pb.BatchRemoveReply(removed=removed)
