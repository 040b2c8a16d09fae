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
from dataclasses import dataclass

import grpc

from tsukimi.kvpool.block_keys import BlockKey
from tsukimi.kvpool.checksum import checksum_matches
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.batch import Op, Status, TransferRequest
from tsukimi.transfer.engine import LocalBuffer, TransferEngine

log = logging.getLogger(__name__)


def _stream_of_reply(before: int, after: int) -> int | None:
    """The `PoolSession.epoch` of the stream a reply came on, from the epochs before the call and after its reply;
    None when the stream may have changed meanwhile (what the reply says may be of a master that is gone)."""
    if after % 2 and (after == before or (after == before + 1 and not before % 2)):
        return after  # NOTE: the same open stream, or the one the call itself opened.
    return None


# Most slots one Reserve asks for (the servicer's bound).
_MAX_RESERVE = 4096
# Most slots kept in stock per block size, however small the blocks (each is an allocation at the master).
_MAX_STOCK = 256


def _hold_margin_s(lease_s: float) -> float:
    """How long before its term a held lease stops being used: time for the last read under it to end, and for
    clocks that run at slightly different rates."""
    return max(1.0, 0.2 * lease_s)


@dataclass(slots=True)
class _Slot:
    """Room reserved for one block, to write with no put start."""

    slot_id: int
    # Where to write.
    replica: pb.Replica
    # Local monotonic time after which it is not written (its term from when its reserve was sent, less a margin).
    until: float
    # `PoolSession.epoch` when the master gave it.
    epoch: int


@dataclass(slots=True)
class _Held:
    """A lease this client kept after reading its block."""

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
        # Block size -> its stock of slots, and when a slot of it was last taken.
        self._stock: dict[int, list[_Slot]] = {}
        self._stock_used_at: dict[int, float] = {}
        # Block sizes whose stock is being refilled in the background.
        self._refilling: set[int] = set()
        # Block size -> until when no slots are asked for (the last reserve found no room).
        self._no_room_until: dict[int, float] = {}
        # (slot id, key, checksum) of slots written, and ids of slots to give back, not sent yet.
        self._slot_ends: list[tuple[int, BlockKey, str]] = []
        self._returned_slots: list[int] = []
        # The stream (`PoolSession.epoch`) the finished work below was done on; None over a plain stub.
        self._work_stream: int | None = None
        self._ends: list[BlockKey] = []
        # (key, lease id) of the leases to give back.
        self._releases: list[tuple[BlockKey, int]] = []
        # Keys read under held leases since the last call.
        self._held_reads: list[BlockKey] = []
        # Key -> its held lease, least recently read first.
        self._held: OrderedDict[BlockKey, _Held] = OrderedDict()
        # Looks for idle held leases and stocks every `hold_idle_s` while there are any.
        self._sweeper: asyncio.TimerHandle | None = None
        # Blocks read under held leases so far (no call to the master).
        self.num_held_reads = 0
        self._flusher: asyncio.TimerHandle | None = None
        # Calls under way that carry finished work, each resolved once answered (`flush` waits for them).
        self._carrying: set[asyncio.Future] = set()
        # Operations and flushes under way (kept until done: `close` waits for them).
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    # ---- the work carried on the next call -----------------------------------------------------------------

    def _stream(self) -> int | None:
        """The session's stream now (`PoolSession.epoch`); None over a plain stub."""
        return getattr(self.stub, "epoch", None)

    def _on_stream(self, stream: int | None) -> bool:
        """Whether finished work done on `stream` may still go out (to the master that stream reached): only
        while that stream is the session's. Work of an earlier stream still waiting is dropped first."""
        if stream != self._stream():
            return False
        self._follow_stream()
        return True

    def _follow_stream(self) -> None:
        """Drops the finished work of a stream that is no longer the session's."""
        if self._work_stream != self._stream():
            self._drop_finished()
            self._work_stream = self._stream()

    def _drop_finished(self) -> None:
        """Drops finished work of a stream that ended: the master on the next one may be another, for which these
        put ends, releases and slots would name someone else's puts and leases (the old master expires them)."""
        if self.num_pending:
            log.info("cache pool: the session's stream ended; %d put ends / releases for its master dropped",
                     self.num_pending)
        self._ends, self._releases, self._held_reads = [], [], []
        self._slot_ends, self._returned_slots = [], []

    def _take_done(self) -> pb.Done | None:
        self._follow_stream()
        if not (self._ends or self._releases or self._held_reads or self._slot_ends or self._returned_slots):
            return None
        done = pb.Done(put_end_keys=self._ends, held_read_keys=self._held_reads, returned_slots=self._returned_slots)
        add = done.releases.add
        for key, lease_id in self._releases:
            release = add()
            release.key, release.lease_id = key, lease_id
        add = done.slot_ends.add
        for slot_id, key, checksum in self._slot_ends:
            end = add()
            end.slot_id, end.key, end.checksum = slot_id, key, checksum
        self._ends, self._releases, self._held_reads = [], [], []
        self._slot_ends, self._returned_slots = [], []
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        return done

    async def _call(self, method, request):
        """One call; while it carries finished work (`request.done`), `flush` knows to wait for it."""
        if not request.HasField("done"):
            return await method(request, timeout=self.rpc_timeout_s)
        answered = asyncio.get_running_loop().create_future()
        self._carrying.add(answered)
        try:
            return await method(request, timeout=self.rpc_timeout_s)
        finally:
            self._carrying.discard(answered)
            answered.set_result(None)

    def _arm(self) -> None:
        """Makes sure finished work goes out within `linger_s` even when no call follows."""
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().call_later(self.linger_s, self._linger_over)

    def _linger_over(self) -> None:
        self._flusher = None
        self._spawn(self._flush_quietly(self._send_finished))

    async def _flush_quietly(self, flush) -> None:
        try:
            await flush()
        except grpc.aio.AioRpcError as exc:
            log.warning("cache pool: sending put ends / releases failed: %s", exc.code().name)

    @property
    def num_pending(self) -> int:
        """Put ends, releases, held reads, slot ends and slots to give back, not sent yet."""
        return (len(self._ends) + len(self._releases) + len(self._held_reads) + len(self._slot_ends)
                + len(self._returned_slots))

    @property
    def num_slots(self) -> int:
        """Reserved slots in stock (see `reserve_bytes`)."""
        return sum(len(stock) for stock in self._stock.values())

    # ---- reserved slots ----------------------------------------------------------------------------------

    def _stock_target(self, size: int) -> int:
        return min(self.reserve_bytes // size, _MAX_STOCK)

    async def _take_slots(self, sizes: Sequence[int]) -> dict[int, _Slot]:
        """Index -> the slot to write it into, for the blocks there is (or can be reserved) stock for."""
        now = time.monotonic()
        epoch = self.stub.epoch
        taken: dict[int, _Slot] = {}
        missing: dict[int, list[int]] = {}  # block size -> indices with no slot yet
        for i, size in enumerate(sizes):
            if size <= 0 or not self._stock_target(size) or self._no_room_until.get(size, 0.0) > now:
                continue
            stock = self._stock.get(size)
            while stock:
                slot = stock.pop()
                if slot.epoch == epoch and slot.until > now:
                    taken[i] = slot
                    break
                # NOTE: one over its term goes back; one of another stream is left to expire (its pool may be gone).
                if self._on_stream(slot.epoch):
                    self._returned_slots.append(slot.slot_id)
            else:
                missing.setdefault(size, []).append(i)
            self._stock_used_at[size] = now
        try:
            for size, indices in missing.items():
                slots = await self._reserve(size, len(indices) + self._stock_target(size))
                if len(slots) < len(indices):
                    # NOTE: the pool had no room (nothing it could evict): puts of this size take put starts for a
                    # while, rather than a reserve and then a put start each.
                    self._no_room_until[size] = now + self.hold_idle_s
                for i, slot in zip(indices, slots):
                    taken[i] = slot
                self._stock.setdefault(size, []).extend(slots[len(indices):])
        except BaseException:
            for i, slot in taken.items():  # NOTE: not written: back in stock.
                self._stock.setdefault(sizes[i], []).append(slot)
            raise
        for size in {sizes[i] for i in taken}:
            if len(self._stock.get(size, ())) <= self._stock_target(size) // 2 and size not in self._refilling:
                self._refilling.add(size)
                self._spawn(self._refill(size))
        self._arm_sweep()
        return taken

    async def _reserve(self, size: int, count: int) -> list[_Slot]:
        """Reserves up to `count` slots of `size` bytes; [] when the stream changed meanwhile (its slots are left
        to expire: their pool may be gone)."""
        before, sent_at = self.stub.epoch, time.monotonic()
        reply = await self._call(self.stub.Reserve, pb.ReserveRequest(size=size, count=min(count, _MAX_RESERVE),
                                                                       done=self._take_done()))
        epoch = _stream_of_reply(before, self.stub.epoch)
        if epoch is None:
            return []
        until = sent_at + reply.term_s - _hold_margin_s(reply.term_s)
        return [_Slot(slot.slot_id, slot.replica, until, epoch) for slot in reply.slots]

    async def _refill(self, size: int) -> None:
        try:
            stock = self._stock.setdefault(size, [])
            wanted = self._stock_target(size) - len(stock)
            if wanted > 0 and not self._closed:
                stock.extend(await self._reserve(size, wanted))
        except grpc.aio.AioRpcError as exc:
            log.warning("cache pool: reserving slots failed: %s", exc.code().name)
        finally:
            self._refilling.discard(size)

    def _return_stock(self, size: int) -> None:
        self._returned_slots.extend(s.slot_id for s in self._stock.pop(size, ()) if self._on_stream(s.epoch))
        self._stock_used_at.pop(size, None)
        self._arm()

    @property
    def num_held(self) -> int:
        """Leases kept after their reads (see `hold_leases`)."""
        return len(self._held)

    # ---- held leases -------------------------------------------------------------------------------------

    def _let_go(self, key: BlockKey) -> None:
        """Stops holding `key`'s lease: given back on the next call (by its last reader, if it is being read). A
        lease of an earlier stream is only forgotten: the master on the stream now may be another, whose own lease
        ids it would give back."""
        held = self._held.pop(key)
        if held.num_readers:
            held.is_let_go = True
        elif self._on_stream(held.epoch):
            self._releases.append((key, held.lease_id))
            self._arm()

    def _let_go_all(self) -> None:
        for key in list(self._held):
            self._let_go(key)

    def _arm_sweep(self) -> None:
        """Makes sure `_sweep` runs within `hold_idle_s`."""
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self.hold_idle_s, self._sweep)

    def _sweep(self) -> None:
        """Lets go of the held leases not read under, and gives back the stocks of slots not written to, for
        `hold_idle_s`; while any is left, looks again later."""
        self._sweeper = None
        idle_since = time.monotonic() - self.hold_idle_s
        held = self._held
        while held:
            key, oldest = next(iter(held.items()))
            if oldest.used_at > idle_since:
                break
            self._let_go(key)
        for size in [n for n, used_at in self._stock_used_at.items() if used_at <= idle_since]:
            if size not in self._refilling:
                self._return_stock(size)
        if held or self._stock:
            self._arm_sweep()

    def _hold(self, key: BlockKey, got: pb.GetReply, sent_at: float, epoch: int) -> bool:
        """Keeps the lease of a block just read; False when it is not kept (the caller gives it back)."""
        until = sent_at + got.lease_s - _hold_margin_s(got.lease_s)
        now = time.monotonic()
        if key in self._held or until <= now:
            return False
        self._held[key] = _Held(got.replicas[0], got.checksum, got.lease_id, until, epoch, now)
        while len(self._held) > self.hold_leases:
            self._let_go(next(iter(self._held)))
        self._arm_sweep()
        return True

    def _take_held(self, key: BlockKey, size: int, now: float, epoch: int) -> _Held | None:
        """The held lease to read `key` under (marked as being read), if one can be used."""
        held = self._held.get(key)
        if held is None:
            return None
        if held.epoch != epoch or held.until <= now:
            self._let_go(key)
            return None
        if held.replica.size != size:
            return None
        held.num_readers += 1
        held.used_at = now
        self._held.move_to_end(key)
        return held

    def _read_over(self, key: BlockKey, held: _Held, ok: bool) -> None:
        """A read under a held lease is over: counted for the master when it read the block, else let go."""
        held.num_readers -= 1
        if ok:
            self.num_held_reads += 1
            if self._on_stream(held.epoch):
                self._held_reads.append(key)
                self._arm()
        elif self._held.get(key) is held:
            self._let_go(key)
        if held.is_let_go and not held.num_readers and self._on_stream(held.epoch):
            self._releases.append((key, held.lease_id))
            self._arm()

    # ---- sending the finished work -----------------------------------------------------------------------

    async def flush(self) -> None:
        """Gives back the held leases, sends the put ends and releases not sent yet and waits for those already on
        their way: blocks whose `put_many` returned are visible afterwards, leases of returned `get_many` calls
        given back."""
        self._let_go_all()
        await self._send_finished()

    async def _send_finished(self) -> None:
        carrying = list(self._carrying)
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
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for size in list(self._stock):
            self._return_stock(size)
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
        slots = await self._take_slots(sizes) if self.reserve_bytes and num_replicas <= 1 else {}
        # The indices that take a put start, and the replicas each got (none: the pool holds it, or no room).
        started: list[int] = [i for i in range(len(keys)) if i not in slots] if slots else list(range(len(keys)))
        replicas_of: dict[int, list] = {}
        put_stream = None  # the stream the put starts were answered on
        try:
            if started:
                before = self._stream()
                request = pb.BatchPutStartRequest(done=self._take_done())
                add = request.puts.add
                for i in started:
                    # NOTE: fields set one by one on added entries: ~2.5x faster than messages built and copied in.
                    put = add()
                    put.key, put.size, put.checksum, put.num_replicas = keys[i], sizes[i], checksums[i], num_replicas
                starts = (await self._call(self.stub.BatchPutStart, request)).puts
                put_stream = before if before is None else _stream_of_reply(before, self._stream())
                replicas_of = {i: start.replicas for i, start in zip(started, starts)}
        except BaseException:
            self._returned_slots.extend(slot.slot_id for slot in slots.values() if self._on_stream(slot.epoch))
            self._arm()
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
                if not self._on_stream(slot.epoch):
                    written[i] = False  # NOTE: its master is gone with its stream (it expires there): not put.
                    continue
                if written[i]:
                    self._slot_ends.append((slot.slot_id, keys[i], checksums[i]))
                else:
                    self._returned_slots.append(slot.slot_id)
            if slots:
                self._arm()
        ends = [keys[i] for i in replicas_of if written[i]]
        failed = [keys[i] for i, replicas in replicas_of.items() if replicas and not written[i]]
        if (ends or failed) and not self._on_stream(put_stream):
            # NOTE: the master that started these puts is gone with its stream (it revokes them when they expire);
            # another master must not take their ends or revocations for puts of its own.
            for i in replicas_of:
                written[i] = False
            ends = failed = []
        if ends:
            self._ends.extend(ends)
            self._arm()
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
        held: dict[int, _Held] = {}
        ask = range(len(keys))  # the indices to ask the master for
        epoch = self._stream()
        if self._held:
            now = time.monotonic()
            ask = []
            for i, key in enumerate(keys):
                # NOTE: a prefix is read under held leases only up to its first block not held; the master answers
                # for the rest (from there on, as a prefix).
                entry = None if is_prefix and ask else self._take_held(key, sizes[i], now, epoch)
                if entry is None:
                    ask.append(i)
                else:
                    held[i] = entry
                    sources[i] = (entry.replica, entry.checksum)
        leases = []  # (index, reply) of the leases the master gave
        can_hold, sent_at, get_stream = False, 0.0, None
        try:
            if ask or not held:  # NOTE: a get of no keys still goes out, with the finished work it carries.
                sent_at, before = time.monotonic(), self._stream()
                request = pb.KeysRequest(keys=[keys[i] for i in ask] if held else keys, done=self._take_done(),
                                         is_prefix=is_prefix)
                gets = (await self._call(self.stub.BatchGet, request)).gets
                # NOTE: a lease is held, or given back, only when its get's stream stayed the same throughout.
                get_stream = before if before is None else _stream_of_reply(before, self._stream())
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
                self._read_over(keys[i], entry, ok[i])
            is_on_stream = bool(leases) and self._on_stream(get_stream)
            for i, got in leases:
                if not (ok[i] and can_hold and self._hold(keys[i], got, sent_at, get_stream)) and is_on_stream:
                    self._releases.append((keys[i], got.lease_id))
            if leases:
                self._arm()
        if verify:
            array = local.array
            for i in indices:
                replica, checksum = sources[i]
                if ok[i] and not checksum_matches(array[offsets[i]:offsets[i] + sizes[i]], checksum):
                    ok[i] = False
                    log.warning("block %s failed its checksum; dropping that replica", keys[i].hex()[:16])
                    if keys[i] in self._held:
                        self._let_go(keys[i])
                    try:
                        await self.stub.DropReplica(pb.DropReplicaRequest(key=keys[i], replica=replica),
                                                    timeout=self.rpc_timeout_s)
                    except grpc.aio.AioRpcError:
                        pass
        return ok
