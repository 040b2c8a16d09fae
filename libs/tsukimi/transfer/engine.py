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
import logging
import os
import time
from collections.abc import Awaitable, Callable

from tsukimi.transfer.batch import Batch, Op, RequestStatus, Status, TransferError, TransferRequest, check_range
from tsukimi.transfer.buffers import Buffers, LocalBuffer
from tsukimi.transfer.descriptor import BufferDescriptor, SegmentDescriptor, local_host_id
from tsukimi.transfer.memory import SharedRegion, as_byte_view, pid_alive, sweep_orphans
from tsukimi.transfer.metadata import METADATA_TIMEOUT_S, MetadataStore
from tsukimi.transfer.metrics import BATCH_SECONDS, requests_counter
from tsukimi.transfer.peers import Peers
from tsukimi.transfer.rdma import RdmaError, RdmaUnavailable
from tsukimi.transfer.rdma_host import RdmaHost
from tsukimi.transfer.tcp_server import TcpServer
from tsukimi.transfer.write_guard import WriteGuard

log = logging.getLogger(__name__)

TRANSPORTS = ("shm", "tcp", "rdma")


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
        self.timeout_s = timeout_s
        self._heartbeat_s = heartbeat_s
        self._buffers = Buffers(self._rdma)
        self._batches: dict[int, Batch] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="transfer-shm")
        self._peers = Peers(metadata, secret, transports=self._transports, force_transport=force_transport,
                            rdma=self._rdma, rdma_problem=self._rdma_problem, executor=self._executor,
                            num_connections=num_connections, window=window, slice_bytes=slice_bytes,
                            shm_slice_bytes=shm_slice_bytes, inline_copy_bytes=inline_copy_bytes,
                            timeout_s=timeout_s)
        self._server: TcpServer | None = None
        self._heartbeat: asyncio.Task | None = None
        self._closing = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called on this engine's event loop with each notification's payload.
        self.on_notify: Callable[[bytes], Awaitable[None] | None] | None = None

    def _open_rdma(self) -> None:
        try:
            self._rdma = RdmaHost(lambda: self._buffers.rdma_regions())
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
        self._server = TcpServer(self._buffers.lookup, self._secret, self._notified, self._host, self._port,
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
        self._peers.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._buffers.close()
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
            published_at=time.time(), generation=self._buffers.generation, buffers=self._buffers.descriptors(),
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
        return self._buffers.add(LocalBuffer(0, view, is_writable=not read_only and not view.readonly))

    def allocate(self, length: int, read_only: bool = False) -> LocalBuffer:
        """Allocates and registers `length` bytes of pre-faulted shared memory: same-host peers reach it with
        one copy. Call `publish()` to announce it."""
        region = SharedRegion.create(length)
        return self._buffers.add(LocalBuffer(0, region.view, is_writable=not read_only, region=region))

    def adopt(self, region: SharedRegion, read_only: bool = False) -> LocalBuffer:
        """Registers shared memory made before this engine (e.g. a decode worker's KV blocks, built with the
        model); the engine owns it from now on and closes it on `unregister`. Call `publish()` to announce it."""
        return self._buffers.add(LocalBuffer(0, region.view, is_writable=not read_only, region=region))

    def guard(self, buffer: LocalBuffer, unit_bytes: int) -> WriteGuard:
        """Guards peers' writes into `buffer`: from now on a WRITE lands only where every `unit_bytes` unit it
        touches holds the tag it carries (`TransferRequest.tag`), as the returned guard's owner assigns them
        (write_guard.py). Peers then reach it over shm or tcp, never rdma. Call `publish()` to announce it."""
        return self._buffers.guard(buffer, unit_bytes)

    def unregister(self, buffer: LocalBuffer) -> None:
        """Withdraws a buffer; later requests for it are refused."""
        self._buffers.remove(buffer)

    # ---- peers -------------------------------------------------------------------------------------------

    async def open_segment(self, name: str, refresh: bool = False) -> SegmentDescriptor:
        """The descriptor of segment `name` (cached; `refresh` re-reads it). Raises TransferError if unknown."""
        return await self._peers.open(name, refresh)

    # ---- batches -----------------------------------------------------------------------------------------

    async def submit(self, requests: list[TransferRequest]) -> int:
        """Starts a batch; returns its id. Requests that cannot start fail at once (see `status`)."""
        batch = Batch(list(requests))
        self._batches[batch.id] = batch
        groups: dict[tuple[str, str, int], list] = {}
        alive: dict[int, bool] = {}
        # (segment, buffer id) -> (descriptor, buffer, transport, why): looked up once per batch, not per request.
        targets: dict[tuple[str, int], tuple] = {}
        await self._peers.refresh_dead({r.segment for r in batch.requests}, alive)
        # NOTE: the checks below run inline for the common case (a request within its buffers); a request that
        # fails one goes through `_check_local` / `_check_target` for the message.
        # id of a local buffer -> (length, is writable), for the registered ones.
        checked_locals: dict[int, tuple[int, bool]] = {}
        buffers = self._buffers.by_id
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
                transport, why = self._peers.choose(peer, buffer) if buffer is not None else ("", "")
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
                    self._peers.drop(segment)
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
                self._peers.dispatch_shm(batch, peer, buffer_id, indices)
            else:
                self._peers.dispatch(batch, peer, transport, buffer_id, indices)
        return batch.id

    def _check_local(self, request: TransferRequest) -> str:
        local = request.local
        if not isinstance(local, LocalBuffer) or self._buffers.by_id.get(local.buffer_id) is not local:
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
            requests_counter(transport or "none", status.value).inc(n)
        for segment in failed_segments:
            # NOTE: the peer may have restarted elsewhere; re-resolve it on next use.
            self._peers.drop(segment)
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
        await self.open_segment(segment)
        tcp = self._peers.tcp(self._peers[segment])
        try:
            await asyncio.to_thread(tcp.notify, payload)
        except OSError as exc:
            self._peers.drop(segment)
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



def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
