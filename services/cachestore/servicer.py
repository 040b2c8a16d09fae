"""The cachestore's gRPC API (`libs/tsukimi/proto/cachestore.proto`) over the pool; answered by the master only."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import grpc

from tsukimi.cachestore import metrics
from tsukimi.cachestore.pool import Pool, PutSpec
from tsukimi.cachestore.records import PoolError, Replica
from tsukimi.cachestore.rpc_timing import timed
from tsukimi.cachestore.session_tasks import SessionTasks
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Most slots one Reserve may ask for.
MAX_RESERVE = 4096


class CacheStoreServicer(pb_grpc.CacheStoreServicer):
    """Translates calls to `Pool` operations; `pool` is None while another instance is the master."""

    def __init__(self, pool: Pool | None = None):
        self.pool = pool
        # Instance id of the master when it is not us (for the refusal message).
        self.master_hint = ""
        # host:port of this instance's session lane (SessionLane); "" when it offers none.
        self.lane_address = ""
        self._exported = metrics.MasterExport()
        # Tasks answering sessions (gRPC streams and lane connections), ended when the pool they talk to goes.
        self._sessions = SessionTasks()

    def _fill(self, out, replicas: list[Replica]) -> None:
        """Appends replicas to a repeated field in place (no intermediate messages)."""
        for r in replicas:
            self._fill_one(out.add(), r)

    def _fill_one(self, replica, r: Replica) -> None:
        """Sets a Replica message's fields from `r`."""
        instance = self.pool.instances[r.instance_id]
        # NOTE: fields set one by one: faster than add(**fields) with upb.
        replica.instance_id, replica.segment, replica.buffer_id = r.instance_id, instance.segment, instance.buffer_id
        replica.tier, replica.offset, replica.size = r.tier, r.offset, r.size

    def export(self) -> None:
        """Sets the per-tier gauges and the eviction counter (called periodically, not per call)."""
        if self.pool is not None:
            self._exported.export(self.pool.master)

    def use(self, pool: Pool | None, master_hint: str = "") -> None:
        """Starts (a new pool) or stops (None) answering as the master. The sessions open with the previous pool
        end: what it told their clients (leases, say) no longer holds."""
        if pool is not self.pool:
            self._sessions.end_all()
        self.pool, self.master_hint, self._exported = pool, master_hint, metrics.MasterExport()

    def is_ending(self, task: asyncio.Task) -> bool:
        """Whether `task` (a session's) was cancelled because its pool went (see `use`)."""
        return self._sessions.is_ending(task)

    def gone_details(self) -> str:
        """Why a session whose pool went ends."""
        if self.pool is None:
            return f"not the pool master{': ask ' + self.master_hint if self.master_hint else ''}"
        return "the pool master's pool was replaced"

    def track_session(self) -> None:
        """Called by the task answering a session: it is cancelled when the pool goes (see `use`)."""
        self._sessions.track()

    async def _done(self, request) -> None:
        """Applies the `done` a batch call carries (put ends and lease releases of the client's earlier calls),
        before the call's own work."""
        if request.HasField("done"):
            await self._apply_done(request.done)

    async def _apply_done(self, done: pb.Done) -> None:
        if self.pool is None:
            return  # NOTE: no pool: this instance stopped being the master (its successor knows none of them).
        if done.releases:
            await self.pool.release([(r.key, r.lease_id) for r in done.releases])
        if done.put_end_keys:
            await self._put_end(list(done.put_end_keys))
        if done.held_read_keys:
            await self._held_reads(list(done.held_read_keys))
        if done.slot_ends:
            sizes = await self.pool.end_slots([(e.slot_id, e.key, e.checksum) for e in done.slot_ends])
            metrics.PUTS.labels("visible").inc(sum(1 for n in sizes if n))
            metrics.PUT_BYTES.inc(sum(sizes))
        if done.returned_slots:
            await self.pool.return_slots(list(done.returned_slots))

    async def _held_reads(self, keys: list[bytes]) -> None:
        """Reads a client made under leases it still held (no get): hits and accesses, as gets would be."""
        num_found, num_bytes = await self.pool.touch(keys)
        metrics.HITS.inc(num_found)
        metrics.GET_BYTES.inc(num_bytes)

    # ---- lookups -----------------------------------------------------------------------------------------

    @timed
    async def Lookup(self, request, context):
        counts = await self.pool.lookup(list(request.keys))
        reply = pb.LookupReply(num_leading=max((n for tiers in counts.values() for n in tiers.values()),
                                               default=0))
        for iid, tiers in counts.items():
            for tier, n in tiers.items():
                reply.counts.append(pb.TierCount(instance_id=iid, tier=tier, num_blocks=n))
        return reply

    @timed
    async def Exists(self, request, context):
        return pb.ExistsReply(exists=(await self.pool.exists([request.key]))[0])

    @timed
    async def BatchExists(self, request, context):
        await self._done(request)
        return pb.BatchExistsReply(exists=await self.pool.exists(list(request.keys)))

    # ---- puts --------------------------------------------------------------------------------------------

    async def _put_start(self, puts) -> list:
        specs = []
        for put in puts:
            if not put.key or put.size <= 0:
                raise ValueError("key and a positive size are required")
            specs.append(PutSpec(put.key, put.size, put.checksum, put.num_replicas))
        results = await self.pool.put_start(specs)
        num_refused = sum(1 for r in results if isinstance(r, PoolError))
        if num_refused:
            metrics.PUTS.labels("no_room").inc(num_refused)
        return results

    @timed
    async def PutStart(self, request, context):
        try:
            (result,) = await self._put_start([request])
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(result, PoolError):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(result))
        reply = pb.PutStartReply()
        self._fill(reply.replicas, result)
        return reply

    @timed
    async def BatchPutStart(self, request, context):
        await self._done(request)
        reply = pb.BatchPutStartReply()
        await self._batch_put_start(request, context, reply)
        return reply

    @timed(name="BatchPutStart")
    async def SessionPutStart(self, request, context, reply) -> None:
        """BatchPutStart as a session message, answered into `reply`: its own work only (the session applies its
        `done` after the reply has gone)."""
        await self._batch_put_start(request, context, reply)

    async def _batch_put_start(self, request, context, reply) -> None:
        try:
            results = await self._put_start(request.puts)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        reply.SetInParent()
        add = reply.puts.add
        for result in results:
            out = add()
            if not isinstance(result, PoolError):
                self._fill(out.replicas, result)

    @timed
    async def Reserve(self, request, context):
        await self._done(request)
        reply = pb.ReserveReply()
        await self._reserve(request, context, reply)
        return reply

    @timed(name="Reserve")
    async def SessionReserve(self, request, context, reply) -> None:
        """Reserve as a session message, answered into `reply`: its own work only (the session applies its `done`
        after the reply has gone)."""
        await self._reserve(request, context, reply)

    async def _reserve(self, request, context, reply) -> None:
        if request.size <= 0 or not 0 < request.count <= MAX_RESERVE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a reserve needs a positive size and a count in 1..{MAX_RESERVE}")
        reply.SetInParent()
        reply.term_s = self.pool.master.put_timeout_s
        add = reply.slots.add
        for slot_id, replica in await self.pool.reserve(request.size, request.count):
            slot = add()
            slot.slot_id = slot_id
            self._fill_one(slot.replica, replica)

    async def _put_end(self, keys: list[bytes]) -> list[int]:
        sizes = await self.pool.put_end(keys)
        metrics.PUTS.labels("visible").inc(sum(1 for s in sizes if s))
        metrics.PUT_BYTES.inc(sum(sizes))
        return sizes

    @timed
    async def PutEnd(self, request, context):
        if not (await self._put_end([request.key]))[0]:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown block (revoked or lost)")
        return pb.Empty()

    @timed
    async def BatchPutEnd(self, request, context):
        await self._done(request)
        if request.keys:
            await self._put_end(list(request.keys))  # NOTE: a block lost meanwhile does not fail the others.
        return pb.Empty()

    @timed
    async def PutRevoke(self, request, context):
        if not (await self.pool.put_revoke([request.key]))[0]:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unknown or already visible block")
        metrics.PUTS.labels("revoked").inc()
        return pb.Empty()

    @timed
    async def BatchPutRevoke(self, request, context):
        await self._done(request)
        metrics.PUTS.labels("revoked").inc(sum(await self.pool.put_revoke(list(request.keys))))
        return pb.Empty()

    # ---- gets --------------------------------------------------------------------------------------------

    async def _get(self, keys: list[bytes], out, is_prefix: bool = False) -> None:
        """Appends one GetReply per key to `out` (a repeated field)."""
        num_hits = num_bytes = 0
        lease_s = self.pool.master.lease_s
        for found in await self.pool.get(keys, is_prefix):
            reply = out.add()
            if found is None:
                continue
            replicas, lease, checksum = found
            num_hits += 1
            num_bytes += replicas[0].size
            reply.found, reply.lease_id, reply.checksum, reply.lease_s = True, lease, checksum, lease_s
            self._fill(reply.replicas, replicas)
        metrics.HITS.inc(num_hits)
        metrics.MISSES.inc(len(keys) - num_hits)
        metrics.GET_BYTES.inc(num_bytes)

    @timed
    async def Get(self, request, context):
        reply = pb.BatchGetReply()
        await self._get([request.key], reply.gets)
        return reply.gets[0]

    @timed
    async def BatchGet(self, request, context):
        reply = pb.BatchGetReply()
        await self._batch_get(request, reply)
        return reply

    @timed(name="BatchGet")
    async def SessionGet(self, request, context, reply) -> None:
        """BatchGet as a session message, answered into `reply`."""
        await self._batch_get(request, reply)

    async def _batch_get(self, request, reply) -> None:
        await self._done(request)
        reply.SetInParent()
        await self._get(list(request.keys), reply.gets, request.is_prefix)

    @timed
    async def Release(self, request, context):
        await self.pool.release([(request.key, request.lease_id)])
        return pb.Empty()

    @timed
    async def BatchRelease(self, request, context):
        await self.pool.release([(r.key, r.lease_id) for r in request.releases])
        return pb.Empty()

    # ---- removal and replicas ----------------------------------------------------------------------------

    @timed
    async def Remove(self, request, context):
        return pb.RemoveReply(removed=(await self.pool.remove([request.key]))[0])

    @timed
    async def BatchRemove(self, request, context):
        await self._done(request)
        return pb.BatchRemoveReply(removed=await self.pool.remove(list(request.keys)))

    @timed
    async def DropReplica(self, request, context):
        r = request.replica
        await self.pool.drop_replica(request.key, Replica(r.instance_id, r.tier, r.offset, r.size))
        metrics.BAD_REPLICAS.inc()
        return pb.Empty()

    async def _change(self, changes) -> list:
        return await self.pool.change_replicas([(c.key, c.num_replicas) for c in changes])

    @timed
    async def ChangeReplicas(self, request, context):
        (result,) = await self._change([request])
        if isinstance(result, PoolError):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(result))
        reply = pb.ChangeReplicasReply()
        self._fill(reply.replicas, result)
        return reply

    @timed
    async def BatchChangeReplicas(self, request, context):
        results = await self._change(request.changes)
        reply = pb.BatchChangeReplicasReply()
        for result in results:
            out = reply.changes.add()
            if not isinstance(result, PoolError):
                self._fill(out.replicas, result)
        return reply

    # ---- sessions ----------------------------------------------------------------------------------------

    async def Session(self, request_iterator, context):
        """The batch calls as messages of one stream, each answered in order by `answer` (a refusal aborts the
        stream with that call's status)."""
        self.track_session()
        try:
            async for request in request_iterator:
                reply, after = await self.answer(request, context)
                yield reply
                if after is not None:
                    await after()
        except asyncio.CancelledError:
            if not self.is_ending(asyncio.current_task()):
                raise
            # NOTE: a cancelled handler alone leaves grpc's stream open; the client must see it end.
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.gone_details())

    async def SessionLane(self, request, context):
        """Answered by any instance (not only the master): where its lane is."""
        return pb.SessionLaneReply(address=self.lane_address)

    async def answer(self, request: pb.SessionRequest, context) -> tuple[pb.SessionReply, Callable | None]:
        """One session message (gRPC stream or session lane): its reply, built by the unary call's own handler
        (timed under its name; a refusal is `context.abort`), and the work to apply once the reply has gone
        (None: nothing), before the next message is read. NOTE: what a put start's or a reserve's `done` carries,
        and the releases and held reads a get's carries, change nothing in that call's answer: they are applied
        after its reply (off the client's wait); the put ends a get carries are applied before it, as a reader may
        ask for what it has just put."""
        op = request.WhichOneof("op")
        if op == "put_start":
            # NOTE: answers are built in place in the reply (no copy of a built message into it).
            reply = pb.SessionReply(id=request.id)
            try:
                await self.SessionPutStart(request.put_start, context, reply.put_start)
            except BaseException:
                # NOTE: a refused put start still ends the puts it carries (their bytes are written), as the
                # unary call does before its own work.
                await self._done(request.put_start)
                raise
            return reply, functools.partial(self._done, request.put_start)
        if op == "get":
            get = request.get
            after = None
            if get.HasField("done") and (get.done.releases or get.done.held_read_keys):
                after = pb.Done(releases=get.done.releases, held_read_keys=get.done.held_read_keys)
                get.done.ClearField("releases")
                get.done.ClearField("held_read_keys")
            reply = pb.SessionReply(id=request.id)
            await self.SessionGet(get, context, reply.get)
            return reply, (functools.partial(self._apply_done, after) if after is not None else None)
        if op == "reserve":
            reply = pb.SessionReply(id=request.id)
            try:
                await self.SessionReserve(request.reserve, context, reply.reserve)
            except BaseException:
                await self._done(request.reserve)  # NOTE: as a refused put start: what it carries is applied.
                raise
            return reply, functools.partial(self._done, request.reserve)
        if op == "put_end":
            return pb.SessionReply(id=request.id, empty=await self.BatchPutEnd(request.put_end, context)), None
        if op == "put_revoke":
            return pb.SessionReply(id=request.id, empty=await self.BatchPutRevoke(request.put_revoke, context)), None
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"session request {request.id} has no operation")

    # ---- stats -------------------------------------------------------------------------------------------

    @timed
    async def Stats(self, request, context):
        self.export()
        master = self.pool.master
        tiers = [pb.TierStats(instance_id=iid, tier=tier, capacity=capacity, used=used, num_blocks=num_blocks)
                 for iid, tier, capacity, used, num_blocks in master.tier_usage()]
        return pb.StatsReply(num_blocks=master.num_blocks,
                             dram_capacity=sum(t.capacity for t in tiers if t.tier == "dram"),
                             dram_used=master.dram_used(), hits=self.pool.num_hits, misses=self.pool.num_misses,
                             evictions=master.num_evictions, tiers=tiers)
