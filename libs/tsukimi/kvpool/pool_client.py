"""A client of the KV cache pool: batch puts and gets of blocks between a registered local buffer and the pool
(metadata over the cachestore's gRPC API, bytes through the transfer engine).

Fewer calls than the plain protocol (BatchPutStart, WRITEs, BatchPutEnd; BatchGet, READs, BatchRelease): the put
ends and lease releases a batch leaves behind ride on the client's next batch call (the `done` field), and go out
in a call of their own only when no call follows within `linger_s` (or on `flush` / `close`). Several batch
operations may be in flight at once (pipelining: the next batch's metadata call overlaps this batch's copies).

With `hold_leases` (over a `PoolSession` only), a reader keeps the leases of the blocks it read instead of giving
each back at once, and reads a block it holds again with no call to the master: the lease keeps the block where
it is, as it did for the first read. A held lease goes back once not used for `hold_idle_s`, when more than
`hold_leases` are held (the least recently used first), on `flush` and `close`; it is not used past its term
(less a margin, counted from when its get was sent), nor after the session's stream ended (the master that gave
it may be gone: see `PoolSession.epoch`). Such reads ride on the next call as `held_read_keys`, so the master
still counts them as hits and accesses.

With `reserve_bytes` (over a `PoolSession` only), a writer keeps a stock of reserved slots (`Reserve`: room for
one block each, keys not known yet) of about that many bytes per block size (at most 256 slots), and writes a
block into a slot with no put start: the block becomes visible with its slot end, which rides on the next call as
a put end does. A stock down to half is filled again in the background; it goes back once not used for
`hold_idle_s` and on `close`. A slot is not written past its term (less a margin) nor after the session's stream
ended. Blocks of more replicas than one, of a size there is no stock of, or of a size the pool just had no room
for, take the plain put start.

What stays as in the plain protocol: a block's put end is sent only after all its bytes are written (a deferred
end makes it visible later, never earlier); a block whose write failed is revoked; a lease is given back only
after the read's copies are over, and a read block is checked against its checksum unless the caller says not to.
An operation whose caller is cancelled still runs to its end (its copies cannot be stopped): ends, revocations
and releases are never skipped, and `close` waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import grpc

from tsukimi.kvpool.block_keys import BlockKey
from tsukimi.kvpool.carried_work import CarriedWork
from tsukimi.kvpool.checksum import checksum_matches
from tsukimi.kvpool.held_leases import HeldLease, HeldLeases
from tsukimi.kvpool.slot_stock import Slot, SlotStock
from tsukimi.kvpool.terms import stream_of_reply, usable_until
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.batch import Op, Status, TransferRequest
from tsukimi.transfer.engine import LocalBuffer, TransferEngine

log = logging.getLogger(__name__)

# Most slots one Reserve asks for (the servicer's bound).
_MAX_RESERVE = 4096


class PoolClient:
    """Batch puts and gets against the pool master behind `stub`; safe to use from many tasks at once."""

    def __init__(self, stub: pb_grpc.CacheStoreStub, transfer: TransferEngine, *, rpc_timeout_s: float = 2.0,
                 linger_s: float = 0.002, hold_leases: int = 0, hold_idle_s: float = 1.0, reserve_bytes: int = 0):
        self.stub = stub
        self.transfer = transfer
        self.rpc_timeout_s = rpc_timeout_s
        # How long finished work (put ends, releases) may wait for a call to ride on before it gets its own.
        self.linger_s = linger_s
        # Most leases kept after their reads (0: each given back after its read); only over a PoolSession.
        is_session = isinstance(getattr(stub, "epoch", None), int)
        self.hold_leases = hold_leases if is_session else 0
        # A held lease not read under, or a stock of slots not written to, for this long goes back.
        self.hold_idle_s = hold_idle_s
        # Bytes of reserved slots kept in stock per block size (0: every put starts with a put start); only over a
        # PoolSession.
        self.reserve_bytes = reserve_bytes if is_session else 0
        self._work = CarriedWork(stub, linger_s, self._linger_over)
        self._leases = HeldLeases(self._work, self.hold_leases, hold_idle_s)
        self._slots = SlotStock(self._work, self._reserve, self._spawn, self.reserve_bytes, hold_idle_s)
        # Operations and flushes under way (kept until done: `close` waits for them).
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    @property
    def num_pending(self) -> int:
        """Put ends, releases, held reads, slot ends and slots to give back, not sent yet."""
        return self._work.num_pending

    @property
    def num_slots(self) -> int:
        """Reserved slots in stock (see `reserve_bytes`)."""
        return self._slots.num_slots

    @property
    def num_held(self) -> int:
        """Leases kept after their reads (see `hold_leases`)."""
        return len(self._leases)

    @property
    def num_held_reads(self) -> int:
        """Blocks read under held leases so far (no call to the master)."""
        return self._leases.num_reads

    @property
    def _held(self) -> OrderedDict[BlockKey, HeldLease]:
        return self._leases.held

    @property
    def _stock(self) -> dict[int, list[Slot]]:
        return self._slots.stock

    # ---- calls and the finished work they carry ------------------------------------------------------------

    def _take_done(self) -> pb.Done | None:
        return self._work.take()

    async def _call(self, method, request):
        """One call; while it carries finished work (`request.done`), `flush` knows to wait for it."""
        return await self._work.call(method, request, self.rpc_timeout_s)

    def _linger_over(self) -> None:
        self._spawn(self._flush_quietly(self._send_finished))

    async def _flush_quietly(self, flush) -> None:
        try:
            await flush()
        except grpc.aio.AioRpcError as exc:
            log.warning("cache pool: sending put ends / releases failed: %s", exc.code().name)

    async def _reserve(self, size: int, count: int) -> list[Slot]:
        """Reserves up to `count` slots of `size` bytes; [] when the stream changed meanwhile (its slots are left
        to expire: their pool may be gone)."""
        before, sent_at = self.stub.epoch, time.monotonic()
        reply = await self._call(self.stub.Reserve, pb.ReserveRequest(size=size, count=min(count, _MAX_RESERVE),
                                                                       done=self._take_done()))
        epoch = stream_of_reply(before, self.stub.epoch)
        if epoch is None:
            return []
        until = usable_until(sent_at, reply.term_s)
        return [Slot(slot.slot_id, slot.replica, until, epoch) for slot in reply.slots]

    async def flush(self) -> None:
        """Gives back the held leases, sends the put ends and releases not sent yet and waits for those already on
        their way: blocks whose `put_many` returned are visible afterwards, leases of returned `get_many` calls
        given back."""
        self._leases.let_go_all()
        await self._send_finished()

    async def _send_finished(self) -> None:
        carrying = self._work.carrying
        done = self._take_done()
        if done is not None:
            # NOTE: not retried: a lost release expires with its lease; a lost end leaves the block invisible, as a
            # lost BatchPutEnd does (a retry could end a block someone else put under the same key since).
            await self._call(self.stub.BatchPutEnd, pb.KeysRequest(done=done))
        if carrying:
            await asyncio.gather(*carrying)

    async def close(self) -> None:
        """Waits for the operations under way, then sends what they left behind."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        self._closed = True
        self._work.close()
        self._leases.close()
        self._slots.close()
        await self._flush_quietly(self.flush)

    # ---- operations --------------------------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, coro):
        """Runs an operation to its end even when the caller is cancelled meanwhile."""
        if self._closed:
            coro.close()
            # NOTE: as a closed PoolSession fails: a caller handles one kind of error for "the pool cannot be asked".
            raise grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "the pool client is closed")
        return await asyncio.shield(self._spawn(coro))

    async def put_many(self, keys: Sequence[BlockKey], local: LocalBuffer, offsets: Sequence[int],
                       sizes: Sequence[int], checksums: Sequence[str], num_replicas: int = 1) -> list[bool]:
        """Writes the blocks at `offsets` of `local` under `keys`; per key, True when this call wrote it (False:
        the pool holds it or is being given it already, had no room, or the write failed; a block written into a
        reserved slot is True even when the pool turns out to hold it already, and keeps that block; False too when
        the session's stream ended meanwhile: the master it reached may be gone). The blocks become visible with
        their put end, which rides on this client's next call (at most `linger_s` later; `flush`
        forces it). Raises grpc.aio.AioRpcError when the pool master cannot be asked."""
        return await self._run(self._put_many(keys, local, offsets, sizes, checksums, num_replicas))

    async def _put_many(self, keys, local, offsets, sizes, checksums, num_replicas) -> list[bool]:
        slots = await self._slots.take(sizes) if self.reserve_bytes and num_replicas <= 1 else {}
        # The indices that take a put start, and the replicas each got (none: the pool holds it, or no room).
        started: list[int] = [i for i in range(len(keys)) if i not in slots] if slots else list(range(len(keys)))
        replicas_of: dict[int, list] = {}
        put_stream = None  # the stream the put starts were answered on
        try:
            if started:
                before = self._work.stream()
                request = pb.BatchPutStartRequest(done=self._take_done())
                add = request.puts.add
                for i in started:
                    # NOTE: fields set one by one on added entries: ~2.5x faster than messages built and copied in.
                    put = add()
                    put.key, put.size, put.checksum, put.num_replicas = keys[i], sizes[i], checksums[i], num_replicas
                starts = (await self._call(self.stub.BatchPutStart, request)).puts
                put_stream = before if before is None else stream_of_reply(before, self._work.stream())
                replicas_of = {i: start.replicas for i, start in zip(started, starts)}
        except BaseException:
            self._work.add_returned_slots([slot.slot_id for slot in slots.values() if self._work.on_stream(slot.epoch)])
            self._work.arm()
            raise
        requests = []
        owners = []  # per request, the index of its key
        write = Op.WRITE
        for i, slot in slots.items():
            replica = slot.replica
            requests.append(TransferRequest(write, local, offsets[i], replica.segment, replica.buffer_id,
                                            replica.offset, sizes[i]))
            owners.append(i)
        for i, replicas in replicas_of.items():
            for replica in replicas:  # NOTE: every replica is written, not only the first.
                requests.append(TransferRequest(write, local, offsets[i], replica.segment, replica.buffer_id,
                                                replica.offset, sizes[i]))
                owners.append(i)
        written = [i in slots or bool(replicas_of.get(i)) for i in range(len(keys))]
        try:
            if requests:
                statuses = await self.transfer.wait(await self.transfer.submit(requests))
                for i, st in zip(owners, statuses):
                    if st.status != Status.COMPLETED:
                        written[i] = False
        finally:
            # NOTE: a slot is ended or given back even when the caller is gone (the write has stopped by then).
            for i, slot in slots.items():
                if not self._work.on_stream(slot.epoch):
                    written[i] = False  # NOTE: its master is gone with its stream (it expires there): not put.
                    continue
                if written[i]:
                    self._work.add_slot_end(slot.slot_id, keys[i], checksums[i])
                else:
                    self._work.add_returned_slots((slot.slot_id,))
            if slots:
                self._work.arm()
        ends = [keys[i] for i in replicas_of if written[i]]
        failed = [keys[i] for i, replicas in replicas_of.items() if replicas and not written[i]]
        if (ends or failed) and not self._work.on_stream(put_stream):
            # NOTE: the master that started these puts is gone with its stream (it revokes them when they expire);
            # another master must not take their ends or revocations for puts of its own.
            for i in replicas_of:
                written[i] = False
            ends = failed = []
        if ends:
            self._work.add_ends(ends)
            self._work.arm()
        if failed:
            log.warning("%d blocks could not be written to the pool; revoked", len(failed))
            await self._call(self.stub.BatchPutRevoke, pb.KeysRequest(keys=failed, done=self._take_done()))
        return written

    async def get_many(self, keys: Sequence[BlockKey], local: LocalBuffer, offsets: Sequence[int],
                       sizes: Sequence[int], verify: bool = True, is_prefix: bool = False) -> list[bool]:
        """Reads the blocks of `keys` into `offsets` of `local`; per key, True when it was read whole (and, with
        `verify`, matched its checksum; a replica that does not is dropped from the pool). A block of another
        size than `sizes` says is not read. With `is_prefix`, only the leading run of blocks the pool holds is
        read (a chained prefix: nothing after its first gap). The leases are given back on the next call (at
        most `linger_s` later). Raises grpc.aio.AioRpcError when the pool master cannot be asked."""
        return await self._run(self._get_many(keys, local, offsets, sizes, verify, is_prefix))

    async def _get_many(self, keys, local, offsets, sizes, verify, is_prefix) -> list[bool]:
        ok = [False] * len(keys)
        # Per key read: where from, and the checksum to verify it against.
        sources: dict[int, tuple[pb.Replica, str]] = {}
        # Index -> the held lease it is read under.
        held: dict[int, HeldLease] = {}
        ask = range(len(keys))  # the indices to ask the master for
        epoch = self._work.stream()
        if self._leases:
            now = time.monotonic()
            ask = []
            for i, key in enumerate(keys):
                # NOTE: a prefix is read under held leases only up to its first block not held; the master answers
                # for the rest (from there on, as a prefix).
                entry = None if is_prefix and ask else self._leases.take(key, sizes[i], now, epoch)
                if entry is None:
                    ask.append(i)
                else:
                    held[i] = entry
                    sources[i] = (entry.replica, entry.checksum)
        leases = []  # (index, reply) of the leases the master gave
        can_hold, sent_at, get_stream = False, 0.0, None
        try:
            if ask or not held:  # NOTE: a get of no keys still goes out, with the finished work it carries.
                sent_at, before = time.monotonic(), self._work.stream()
                request = pb.KeysRequest(keys=[keys[i] for i in ask] if held else keys, done=self._take_done(),
                                         is_prefix=is_prefix)
                gets = (await self._call(self.stub.BatchGet, request)).gets
                # NOTE: a lease is held, or given back, only when its get's stream stayed the same throughout.
                get_stream = before if before is None else stream_of_reply(before, self._work.stream())
                can_hold = self.hold_leases > 0 and get_stream is not None
                for i, got in zip(ask, gets):
                    if not got.found:
                        continue
                    leases.append((i, got))
                    replica = got.replicas[0]
                    if replica.size == sizes[i]:
                        sources[i] = (replica, got.checksum)
            read = Op.READ
            indices = list(sources)
            requests = [TransferRequest(read, local, offsets[i], sources[i][0].segment, sources[i][0].buffer_id,
                                        sources[i][0].offset, sizes[i]) for i in indices]
            if requests:
                statuses = await self.transfer.wait(await self.transfer.submit(requests))
                completed = Status.COMPLETED
                for i, st in zip(indices, statuses):
                    ok[i] = st.status is completed
        finally:
            # NOTE: after the copies only: the lease keeps the bytes in place while they are read.
            for i, entry in held.items():
                self._leases.read_over(keys[i], entry, ok[i])
            is_on_stream = bool(leases) and self._work.on_stream(get_stream)
            for i, got in leases:
                if not (ok[i] and can_hold and self._leases.hold(keys[i], got, sent_at, get_stream)) and is_on_stream:
                    self._work.add_release(keys[i], got.lease_id)
            if leases:
                self._work.arm()
        if verify:
            array = local.array
            for i in indices:
                replica, checksum = sources[i]
                if ok[i] and not checksum_matches(array[offsets[i]:offsets[i] + sizes[i]], checksum):
                    ok[i] = False
                    log.warning("block %s failed its checksum; dropping that replica", keys[i].hex()[:16])
                    if keys[i] in self._leases:
                        self._leases.let_go(keys[i])
                    try:
                        await self.stub.DropReplica(pb.DropReplicaRequest(key=keys[i], replica=replica),
                                                    timeout=self.rpc_timeout_s)
                    except grpc.aio.AioRpcError:
                        pass
        return ok
