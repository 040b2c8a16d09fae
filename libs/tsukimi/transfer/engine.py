"""The transfer engine: the one way KV bytes move between processes (Mooncake's Transfer Engine, in Python).

A process creates one engine with a unique segment name, registers buffers, and publishes its segment
descriptor in the metadata store. Peers submit batches of READ/WRITE requests against its buffers; the target's
application does nothing per transfer. Transport per peer: shm on the same host, else rdma when both offer it,
else tcp; `TSUKIMI_TRANSFER_TRANSPORT` (or `force_transport`) forces one, and a forced transport that cannot
reach a peer fails the request rather than falling back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from tsukimi.transfer.batch import Batch, Op, RequestStatus, Status, TransferRequest, check_range, cut
from tsukimi.transfer.descriptor import BufferDescriptor, SegmentDescriptor, local_host_id
from tsukimi.transfer.memory import SharedRegion, as_byte_view, pid_alive, sweep_orphans
from tsukimi.transfer.metadata import MetadataStore
from tsukimi.transfer.rdma import MemoryRegion, RdmaError, RdmaUnavailable
from tsukimi.transfer.rdma_host import RdmaHost
from tsukimi.transfer.rdma_peer import RdmaPeer
from tsukimi.transfer.shm_peer import ShmPeer
from tsukimi.transfer.tcp_peer import TcpPeer
from tsukimi.transfer.tcp_server import TcpServer
from tsukimi.transfer.write_guard import WriteGuard

log = logging.getLogger(__name__)

TRANSPORTS = ("shm", "tcp", "rdma")
# Seconds a metadata-store call may take.
METADATA_TIMEOUT_S = 3.0

BYTES = Counter("tsukimi_transfer_bytes_total", "Bytes moved by the transfer engine", ["transport", "op"])
REQUESTS = Counter("tsukimi_transfer_requests_total", "Transfer requests by outcome", ["transport", "status"])
PEER_TRANSPORT = Gauge("tsukimi_transfer_peer_transport", "Transport chosen for a peer (1)", ["peer", "transport"])
BATCH_SECONDS = Histogram("tsukimi_transfer_batch_seconds", "Submission to completion of a batch",
                          buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))


class TransferError(RuntimeError):
    """A transfer did not complete; the message says which request and why."""


@dataclass
class LocalBuffer:
    """A buffer this engine registered."""

    buffer_id: int
    view: memoryview
    is_writable: bool
    # Set when the engine allocated it in shared memory (peers on this host map it).
    region: SharedRegion | None = None
    # Its RDMA registration, when the engine offers rdma (and the memory could be registered).
    mr: MemoryRegion | None = None
    # Who may write where in it, when its application guards it (see `TransferEngine.guard`).
    guard: WriteGuard | None = None

    # Its bytes as a uint8 numpy array (made on first use by the shm transport).
    _array: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def length(self) -> int:
        return len(self.view)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.frombuffer(self.view, dtype=np.uint8)
        return self._array


@dataclass
class _Peer:
    descriptor: SegmentDescriptor
    tcp: TcpPeer | None = None
    shm: ShmPeer | None = None
    rdma: RdmaPeer | None = None
    logged: set | None = None
    # Transport chosen per buffer id: (transport, "") or ("", why none).
    choices: dict | None = None


class TransferEngine:
    """One per process. Async API; data moves on the engine's own threads, except a shm submission's share of at
    most `inline_copy_bytes` (default 4 MiB, ~0.3 ms here), which `submit` copies itself: waking a thread to
    copy it, and the event loop when it is done, costs more than that share's copy takes over (measured with the
    shared copy queue: batches of 32 x 256 KiB 10.5-10.7 -> 13.1 GB/s on the project's 2-core VMs)."""

    def __init__(
        self,
        segment_name: str,
        secret: bytes,
        metadata: MetadataStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        transports: tuple[str, ...] = ("shm", "tcp"),
        force_transport: str | None = None,
        num_connections: int = 4,
        window: int = 16,
        slice_bytes: int = 1 << 20,
        shm_slice_bytes: int = 1 << 20,
        timeout_s: float = 10.0,
        heartbeat_s: float | None = None,
        inline_copy_bytes: int = 4 << 20,
    ):
        if not secret:
            raise ValueError("a cluster secret is required: peers authenticate with it")
        force_transport = force_transport or os.environ.get("TSUKIMI_TRANSFER_TRANSPORT") or None
        if force_transport is not None and force_transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {force_transport!r}; choose one of {TRANSPORTS}")
        self.segment_name = segment_name
        self._secret = secret
        self._metadata = metadata
        self._host = host
        self._port = port
        if force_transport == "rdma" and "rdma" not in transports:
            transports = (*transports, "rdma")  # NOTE: forcing rdma opts in to it.
        # This engine's RDMA device when it offers rdma, else why not.
        self._rdma: RdmaHost | None = None
        self._rdma_problem = "this engine does not offer it"
        if "rdma" in transports:
            self._open_rdma()
        self._transports = tuple(t for t in transports if t != "rdma" or self._rdma is not None)
        self.force_transport = force_transport
        self._num_connections = num_connections
        self._window = window
        self._slice_bytes = slice_bytes
        # NOTE: a shm request is cut into copies of at most this size, so that one large request is shared by the
        # copy jobs too (a single 4 MiB pool get: 5.6-5.7 -> 6.1-6.4 GB/s with 1 MiB against 8 MiB here).
        self._shm_slice_bytes = shm_slice_bytes
        # A shm submission's share of at most this many bytes is copied by the submitting thread (see ShmPeer).
        self._inline_copy_bytes = inline_copy_bytes
        self.timeout_s = timeout_s
        self._heartbeat_s = heartbeat_s
        self._buffers: dict[int, LocalBuffer] = {}
        self._next_buffer_id = 1
        self._generation = 0
        self._peers: dict[str, _Peer] = {}
        self._batches: dict[int, Batch] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="transfer-shm")
        self._server: TcpServer | None = None
        self._heartbeat: asyncio.Task | None = None
        self._closing = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called on this engine's event loop with each notification's payload.
        self.on_notify: Callable[[bytes], Awaitable[None] | None] | None = None

    def _open_rdma(self) -> None:
        try:
            self._rdma = RdmaHost(self._rdma_regions)
        except (RdmaUnavailable, RdmaError) as exc:
            self._rdma_problem = f"unavailable here: {exc}"
            log.info("rdma transport unavailable: %s", exc)

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> "TransferEngine":
        """Serves this segment and publishes its descriptor (then keeps it fresh)."""
        self._loop = asyncio.get_running_loop()
        for name in sweep_orphans():
            log.info("removed shared memory %s left by a dead process", name)
        rdma = self._rdma
        if hasattr(self._metadata, "open"):
            await self._metadata.open()
        self._server = TcpServer(self._lookup, self._secret, self._notified, self._host, self._port,
                                 rdma_accept=rdma.accept if rdma else None,
                                 rdma_regions=rdma.regions_reply if rdma else None).start()
        await self.publish()
        interval = min(self._heartbeat_s or float("inf"), getattr(self._metadata, "ttl_s", 10.0) / 3)
        self._heartbeat = asyncio.create_task(self._republish(interval))
        log.info("transfer engine %s on %s (transports: %s%s)", self.segment_name, self._server.address,
                 ", ".join(self._transports), f"; forced {self.force_transport}" if self.force_transport else "")
        return self

    async def close(self) -> None:
        """Withdraws the descriptor, stops serving, frees shared memory."""
        self._closing.set()
        if self._heartbeat is not None:
            # NOTE: stopped by the event, not by cancellation: nats-py can turn a cancellation inside a request
            # into a timeout error, which the refresh loop would survive.
            done, _ = await asyncio.wait([self._heartbeat], timeout=METADATA_TIMEOUT_S + 1)
            if not done:
                self._heartbeat.cancel()
        try:
            await asyncio.wait_for(self._metadata.delete(self.segment_name), METADATA_TIMEOUT_S)
        except Exception as exc:
            log.warning("could not withdraw descriptor (it expires with its TTL): %r", exc)
        if self._server is not None:
            await asyncio.to_thread(self._server.close)
        for peer in self._peers.values():
            if peer.tcp:
                peer.tcp.close()
            if peer.shm:
                peer.shm.forget()
            if peer.rdma:
                peer.rdma.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for buffer in self._buffers.values():
            if buffer.mr is not None:
                self._rdma.deregister(buffer.mr)
            if buffer.region is not None:
                buffer.region.close()
            if buffer.guard is not None:
                buffer.guard.close()
        self._buffers.clear()
        if self._rdma is not None:
            # NOTE: transfers still in flight then fail ("device is closed"); peers' QPs here are destroyed.
            self._rdma.close()

    async def __aenter__(self) -> "TransferEngine":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def address(self) -> str:
        """"host:port" of this engine's TCP endpoint."""
        return self._server.address if self._server else ""

    def descriptor(self) -> SegmentDescriptor:
        return SegmentDescriptor(
            name=self.segment_name, host_id=local_host_id(), pid=os.getpid(), tcp_address=self.address,
            transports=list(self._transports), rdma_device=self._rdma.name if self._rdma else "",
            published_at=time.time(), generation=self._generation,
            buffers=[BufferDescriptor(b.buffer_id, b.length, b.is_writable, b.region.name if b.region else "",
                                      b.guard.region.name if b.guard else "", b.guard.unit_bytes if b.guard else 0)
                     for b in self._buffers.values()],
        )

    async def publish(self) -> None:
        """Writes the current descriptor to the metadata store."""
        await self._metadata.put(self.descriptor())

    async def _republish(self, interval_s: float) -> None:
        while not self._closing.is_set():
            try:
                await asyncio.wait_for(self._closing.wait(), interval_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await asyncio.wait_for(self.publish(), METADATA_TIMEOUT_S)
            except Exception as exc:  # NOTE: a missed heartbeat must not stop the next ones.
                log.warning("descriptor heartbeat failed: %r", exc)

    # ---- memory ------------------------------------------------------------------------------------------

    def register(self, obj, read_only: bool = False) -> LocalBuffer:
        """Registers private memory (bytearray, mmap, numpy array, torch CPU tensor). Peers reach it over tcp
        (or rdma); same-host peers too, since it is not shared. Call `publish()` to announce new buffers."""
        view = as_byte_view(obj)
        return self._add(LocalBuffer(0, view, is_writable=not read_only and not view.readonly))

    def allocate(self, length: int, read_only: bool = False) -> LocalBuffer:
        """Allocates and registers `length` bytes of pre-faulted shared memory: same-host peers reach it with
        one copy. Call `publish()` to announce it."""
        region = SharedRegion.create(length)
        return self._add(LocalBuffer(0, region.view, is_writable=not read_only, region=region))

    def adopt(self, region: SharedRegion, read_only: bool = False) -> LocalBuffer:
        """Registers shared memory made before this engine (e.g. a decode worker's KV blocks, built with the
        model); the engine owns it from now on and closes it on `unregister`. Call `publish()` to announce it."""
        return self._add(LocalBuffer(0, region.view, is_writable=not read_only, region=region))

    def guard(self, buffer: LocalBuffer, unit_bytes: int) -> WriteGuard:
        """Guards peers' writes into `buffer`: from now on a WRITE lands only where every `unit_bytes` unit it
        touches holds the tag it carries (`TransferRequest.tag`), as the returned guard's owner assigns them
        (write_guard.py). Peers then reach it over shm or tcp, never rdma. Call `publish()` to announce it."""
        if buffer.guard is None:
            buffer.guard = WriteGuard(buffer.length, unit_bytes)
            if buffer.mr is not None:
                # NOTE: withdrawn from rdma peers too, whose writes it could not check.
                self._rdma.deregister(buffer.mr)
                buffer.mr = None
            self._generation += 1
        return buffer.guard

    def _add(self, buffer: LocalBuffer) -> LocalBuffer:
        buffer.buffer_id = self._next_buffer_id
        self._next_buffer_id += 1
        if self._rdma is not None:
            try:
                buffer.mr = self._rdma.register(buffer.view, buffer.is_writable)
            except (ValueError, RdmaError) as exc:
                # NOTE: e.g. read-only memory (bytes): it stays reachable over shm/tcp, rdma refuses it.
                log.warning("buffer %d is not registered for rdma: %s", buffer.buffer_id, exc)
        self._buffers[buffer.buffer_id] = buffer
        self._generation += 1
        return buffer

    def unregister(self, buffer: LocalBuffer) -> None:
        """Withdraws a buffer; later requests for it are refused."""
        if self._buffers.pop(buffer.buffer_id, None) is not None:
            self._generation += 1
            if buffer.mr is not None:
                self._rdma.deregister(buffer.mr)
            if buffer.region is not None:
                buffer.region.close()
            if buffer.guard is not None:
                buffer.guard.close()

    def _lookup(self, buffer_id: int) -> tuple[memoryview, bool, WriteGuard | None] | None:
        buffer = self._buffers.get(buffer_id)
        return (buffer.view, buffer.is_writable, buffer.guard) if buffer else None

    def _rdma_regions(self) -> list[tuple[int, MemoryRegion, bool]]:
        # NOTE: called from the TCP server's threads; list() copies the values in one step under the GIL.
        return [(b.buffer_id, b.mr, b.is_writable) for b in list(self._buffers.values()) if b.mr is not None]

    # ---- peers -------------------------------------------------------------------------------------------

    async def open_segment(self, name: str, refresh: bool = False) -> SegmentDescriptor:
        """The descriptor of segment `name` (cached; `refresh` re-reads it). Raises TransferError if unknown."""
        peer = self._peers.get(name)
        if peer is not None and not refresh:
            return peer.descriptor
        try:
            descriptor = await asyncio.wait_for(self._metadata.get(name), METADATA_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise TransferError(f"metadata store did not answer for segment {name!r}") from None
        if descriptor is None:
            raise TransferError(f"segment {name!r} is not published (unknown, or its process died)")
        if peer is not None and (peer.descriptor.tcp_address != descriptor.tcp_address
                                 or peer.descriptor.pid != descriptor.pid):
            self._drop_peer(name)
            peer = None
        if peer is None:
            self._peers[name] = _Peer(descriptor, logged=set(), choices={})
        else:
            if peer.descriptor.generation != descriptor.generation:
                peer.choices.clear()
            peer.descriptor = descriptor
        return descriptor

    async def _refresh_dead_peers(self, names: set[str], alive: dict[int, bool]) -> None:
        """Re-reads the descriptors of same-host peers whose process has died: a restarted peer published a new
        one under the same name (a dead one stays dead, and its requests fail). Records in `alive` what it learnt
        of each pid, so the batch does not ask again."""
        for name in names:
            peer = self._peers.get(name)
            if peer is None or peer.descriptor.host_id != local_host_id():
                continue
            pid = peer.descriptor.pid
            alive[pid] = pid_alive(pid)
            if alive[pid]:
                continue
            try:
                descriptor = await self.open_segment(name, refresh=True)
            except TransferError:
                continue
            if descriptor.pid not in alive:
                alive[descriptor.pid] = pid_alive(descriptor.pid)

    def _drop_peer(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is not None:
            if peer.tcp:
                peer.tcp.close()
            if peer.shm:
                peer.shm.forget()
            if peer.rdma:
                peer.rdma.close()

    def _choose(self, peer: _Peer, buffer: BufferDescriptor) -> tuple[str, str]:
        """(transport, "") for a request to `buffer` of `peer`, or ("", why none can carry it); cached."""
        choice = peer.choices.get(buffer.buffer_id)
        if choice is None:
            choice = peer.choices[buffer.buffer_id] = self._choose_uncached(peer, buffer)
        return choice

    def _choose_uncached(self, peer: _Peer, buffer: BufferDescriptor) -> tuple[str, str]:
        d = peer.descriptor
        same_host = d.host_id == local_host_id()
        if self.force_transport:
            options = [self.force_transport]
        else:
            options = [t for t in ("shm", "rdma", "tcp") if t in self._transports and t in d.transports]
        reasons = []
        for transport in options:
            if transport == "shm":
                if not same_host:
                    reasons.append("shm: peer is on another host")
                    continue
                if peer.shm is None:
                    peer.shm = ShmPeer(self._executor, inline_bytes=self._inline_copy_bytes)
                problem = peer.shm.can_reach(buffer)
                if problem:
                    reasons.append(f"shm: {problem}")
                    continue
            elif transport == "rdma":
                if self._rdma is None:
                    reasons.append(f"rdma: {self._rdma_problem}")
                    continue
                if "rdma" not in d.transports:
                    reasons.append("rdma: peer does not offer it")
                    continue
                if same_host and not self.force_transport:
                    reasons.append("rdma: peer is on this host")
                    continue
                if buffer.guard_shm_name:
                    reasons.append("rdma: the buffer's writes are guarded (one-sided RDMA writes go unchecked)")
                    continue
            elif transport == "tcp" and "tcp" not in d.transports:
                reasons.append("tcp: peer does not offer it")
                continue
            self._log_choice(peer, buffer, transport, reasons)
            return transport, ""
        return "", "; ".join(reasons) or "no common transport"

    def _log_choice(self, peer: _Peer, buffer: BufferDescriptor, transport: str, reasons: list[str]) -> None:
        key = (buffer.buffer_id, transport)
        if key in peer.logged:
            return
        peer.logged.add(key)
        PEER_TRANSPORT.labels(peer.descriptor.name, transport).set(1)
        why = f" ({'; '.join(reasons)})" if reasons else ""
        log.info("transfers to %s buffer %d use %s%s", peer.descriptor.name, buffer.buffer_id, transport, why)

    # ---- batches -----------------------------------------------------------------------------------------

    async def submit(self, requests: list[TransferRequest]) -> int:
        """Starts a batch; returns its id. Requests that cannot start fail at once (see `status`)."""
        batch = Batch(list(requests))
        self._batches[batch.id] = batch
        groups: dict[tuple[str, str, int], list] = {}
        alive: dict[int, bool] = {}
        # (segment, buffer id) -> (descriptor, buffer, transport, why): looked up once per batch, not per request.
        targets: dict[tuple[str, int], tuple] = {}
        await self._refresh_dead_peers({r.segment for r in batch.requests}, alive)
        # NOTE: the checks below run inline for the common case (a request within its buffers); a request that
        # fails one goes through `_check_local` / `_check_target` for the message.
        # id of a local buffer -> (length, is writable), for the registered ones.
        checked_locals: dict[int, tuple[int, bool]] = {}
        buffers = self._buffers
        for index, request in enumerate(batch.requests):
            local = request.local
            checked = checked_locals.get(id(local))
            if checked is None and isinstance(local, LocalBuffer) and buffers.get(local.buffer_id) is local:
                checked = checked_locals[id(local)] = (local.length, local.is_writable)
            offset, length = request.local_offset, request.length
            if (checked is None or offset < 0 or length <= 0 or offset + length > checked[0]
                    or (request.op == Op.READ and not checked[1])):
                batch.fail(index, self._check_local(request))
                continue
            segment = request.segment
            peer = self._peers.get(segment)
            if peer is None:
                try:
                    await self.open_segment(segment)
                except TransferError as exc:
                    batch.fail(index, str(exc))
                    continue
                peer = self._peers[segment]
            descriptor = peer.descriptor
            target = targets.get((segment, request.buffer_id))
            if target is None or target[0] is not descriptor:
                buffer = descriptor.buffer(request.buffer_id)
                transport, why = self._choose(peer, buffer) if buffer is not None else ("", "")
                target = targets[(segment, request.buffer_id)] = (descriptor, buffer, transport, why)
            _, buffer, transport, why = target
            offset = request.target_offset
            if (buffer is None or offset < 0 or offset + length > buffer.length
                    or (request.op == Op.WRITE and not buffer.is_writable)):
                batch.fail(index, self._check_target(descriptor, buffer, request))
                continue
            if not transport:
                batch.fail(index, f"no transport reaches {segment}: {why}")
                continue
            if transport == "shm":
                is_alive = alive.get(descriptor.pid)
                if is_alive is None:
                    is_alive = alive[descriptor.pid] = pid_alive(descriptor.pid)
                if not is_alive:
                    self._drop_peer(segment)
                    batch.fail(index, f"segment {segment}'s process {descriptor.pid} is gone")
                    continue
            group = groups.get((segment, transport, request.buffer_id))
            if group is None:
                groups[(segment, transport, request.buffer_id)] = [index]
            else:
                group.append(index)
        for (segment, transport, buffer_id), indices in groups.items():
            peer = self._peers.get(segment)
            if peer is None:
                for index in indices:
                    batch.fail(index, f"segment {segment} went away")
                continue
            if transport == "shm":
                self._dispatch_shm(batch, peer, buffer_id, indices)
            else:
                self._dispatch(batch, peer, transport, buffer_id, indices)
        return batch.id

    def _dispatch_shm(self, batch: Batch, peer: _Peer, buffer_id: int, indices: list[int]) -> None:
        """Hands `indices` of `batch` to the shm transport as plain copies: no per-request slice objects or
        completion calls (a job reports all it moved at once)."""
        size = self._shm_slice_bytes
        requests = batch.requests
        copies = []
        counts = []
        num_bytes = {Op.READ: 0, Op.WRITE: 0}
        for index in indices:
            request = requests[index]
            op, length, local_offset, target_offset = (request.op, request.length, request.local_offset,
                                                       request.target_offset)
            local = request.local.array
            if length <= size:
                copies.append((index, op, local, local_offset, target_offset, length))
                counts.append((index, 1))
            else:
                n = 0
                for start in range(0, length, size):
                    copies.append((index, op, local, local_offset + start, target_offset + start,
                                   min(size, length - start)))
                    n += 1
                counts.append((index, n))
            num_bytes[op] += length
        batch.start_many(counts, "shm")
        for op, n in num_bytes.items():
            if n:
                _bytes_counter("shm", op).inc(n)
        peer.shm.submit_copies(peer.descriptor.buffer(buffer_id), batch, copies,
                               num_bytes[Op.READ] + num_bytes[Op.WRITE])

    def _dispatch(self, batch: Batch, peer: _Peer, transport: str, buffer_id: int, indices: list[int]) -> None:
        slices = []
        size = self._shm_slice_bytes if transport == "shm" else self._slice_bytes
        if transport == "rdma":
            size = min(size, self._rdma.max_message_size)
        num_bytes = {Op.READ: 0, Op.WRITE: 0}
        for index in indices:
            request = batch.requests[index]
            local = request.local.view[request.local_offset:request.local_offset + request.length]
            pieces = cut(batch, index, local, size)
            batch.start(index, len(pieces), transport)
            num_bytes[request.op] += request.length
            slices.extend(pieces)
        for op, n in num_bytes.items():
            if n:
                _bytes_counter(transport, op).inc(n)
        if transport == "rdma":
            if peer.rdma is None:
                peer.rdma = RdmaPeer(self._rdma, peer.descriptor.tcp_address, self._secret, self.timeout_s)
            peer.rdma.submit(peer.descriptor.buffer(buffer_id), slices)
        else:
            if peer.tcp is None:
                peer.tcp = TcpPeer(peer.descriptor.tcp_address, self._secret, self._num_connections, self._window,
                                   self.timeout_s)
            peer.tcp.submit(slices)

    def _check_local(self, request: TransferRequest) -> str:
        local = request.local
        if not isinstance(local, LocalBuffer) or self._buffers.get(local.buffer_id) is not local:
            return "local buffer is not registered with this engine"
        problem = check_range(request.local_offset, request.length, local.length)
        if problem:
            return f"local {problem}"
        if request.op == Op.READ and not local.is_writable:
            return "local buffer is read-only: cannot READ into it"
        return ""

    @staticmethod
    def _check_target(descriptor: SegmentDescriptor, buffer: BufferDescriptor | None,
                      request: TransferRequest) -> str:
        if buffer is None:
            return f"segment {descriptor.name} has no buffer {request.buffer_id}"
        if request.op == Op.WRITE and not buffer.is_writable:
            return f"buffer {request.buffer_id} of {descriptor.name} is read-only"
        problem = check_range(request.target_offset, request.length, buffer.length)
        return f"target {problem}" if problem else ""

    def status(self, batch_id: int) -> list[RequestStatus]:
        """Per-request status of a batch."""
        batch = self._batches.get(batch_id)
        if batch is None:
            raise KeyError(f"no batch {batch_id}")
        return batch.snapshot()

    async def wait(self, batch_id: int, timeout_s: float | None = None) -> list[RequestStatus]:
        """Waits for a batch to end (at most `timeout_s`, default the engine's timeout plus a margin); requests
        still open then are marked TIMEOUT. Forgets the batch."""
        batch = self._batches[batch_id]
        limit = timeout_s if timeout_s is not None else 2 * self.timeout_s + 1
        if not batch.is_done:
            # NOTE: one future, resolved by the batch's completion (from a transport thread) or by a timer; no
            # wait_for/shield tasks per batch.
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            batch.add_done_callback(lambda: loop.call_soon_threadsafe(_resolve, done))
            timer = loop.call_later(limit, _resolve, done)
            try:
                await done
            finally:
                timer.cancel()
        if not batch.is_done:
            for index, st in enumerate(batch.snapshot()):
                if not st.status.is_final:
                    batch.fail(index, f"no completion within {limit}s", Status.TIMEOUT)
        del self._batches[batch_id]
        statuses = batch.final_statuses()
        BATCH_SECONDS.observe(time.monotonic() - batch.submitted_at)
        failed_segments = set()
        outcomes: dict[tuple[str, Status], int] = {}
        completed = Status.COMPLETED
        for request, st in zip(batch.requests, statuses):
            key = (st.transport, st.status)
            outcomes[key] = outcomes.get(key, 0) + 1
            if st.status is not completed:
                failed_segments.add(request.segment)
        for (transport, status), n in outcomes.items():
            _requests_counter(transport or "none", status.value).inc(n)
        for segment in failed_segments:
            # NOTE: the peer may have restarted elsewhere; re-resolve it on next use.
            self._drop_peer(segment)
        return statuses

    async def transfer(self, requests: list[TransferRequest], timeout_s: float | None = None) -> list[RequestStatus]:
        """Submits a batch and waits for it; raises TransferError naming the first failed request."""
        statuses = await self.wait(await self.submit(requests), timeout_s)
        for index, st in enumerate(statuses):
            if st.status != Status.COMPLETED:
                r = requests[index]
                raise TransferError(f"{r.op.name} of {r.length} bytes at {r.segment}/{r.buffer_id}+{r.target_offset}: "
                                    f"{st.status.value}: {st.error}")
        return statuses

    async def write(self, local: LocalBuffer, local_offset: int, segment: str, buffer_id: int, target_offset: int,
                    length: int) -> None:
        """Copies local bytes into a peer's buffer; returns once they are in its memory."""
        await self.transfer([TransferRequest(Op.WRITE, local, local_offset, segment, buffer_id, target_offset,
                                             length)])

    async def read(self, local: LocalBuffer, local_offset: int, segment: str, buffer_id: int, target_offset: int,
                   length: int) -> None:
        """Copies a peer's bytes into a local buffer."""
        await self.transfer([TransferRequest(Op.READ, local, local_offset, segment, buffer_id, target_offset,
                                             length)])

    # ---- notifications -----------------------------------------------------------------------------------

    async def notify(self, segment: str, payload: bytes) -> None:
        """Delivers `payload` to the peer's `on_notify` (after every transfer this engine completed to it)."""
        descriptor = await self.open_segment(segment)
        peer = self._peers[segment]
        if peer.tcp is None:
            peer.tcp = TcpPeer(descriptor.tcp_address, self._secret, self._num_connections, self._window,
                               self.timeout_s)
        try:
            await asyncio.to_thread(peer.tcp.notify, payload)
        except OSError as exc:
            self._drop_peer(segment)
            raise TransferError(f"notification to {segment} failed: {exc}") from exc

    def _notified(self, payload: bytes) -> None:
        handler, loop = self.on_notify, self._loop
        if handler is None or loop is None:
            return

        def run() -> None:
            result = handler(payload)
            if asyncio.iscoroutine(result):
                loop.create_task(result)

        loop.call_soon_threadsafe(run)


@functools.cache
def _bytes_counter(transport: str, op: Op):
    return BYTES.labels(transport, op.name)


@functools.cache
def _requests_counter(transport: str, status: str):
    return REQUESTS.labels(transport, status)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
