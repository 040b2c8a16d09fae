"""The initiator side of the RDMA transport: one-sided RDMA WRITE/READ to one peer's registered buffers.

`RdmaPeer`, over the engine's authenticated TCP connection, exchanges queue-pair details and learns the peer's
regions (OP_RDMA_CONNECT, OP_RDMA_REGIONS in wire.py, answered by the peer's `RdmaHost`, rdma_host.py), then
posts slices on its RC queue pair and completes them from the completion queue. The target's CPU does nothing
per transfer.

NOTE: every verbs call on the engine's device holds `RdmaHost.lock` (see rdma_host.py). Slices are completed
outside that lock.
"""

from __future__ import annotations

import collections
import logging
import queue
import socket
import threading
import time

import msgspec

from tsukimi.transfer import wire
from tsukimi.transfer.batch import Op, Slice, Status
from tsukimi.transfer.descriptor import BufferDescriptor
from tsukimi.transfer.rdma import RdmaError, RemoteRegion
from tsukimi.transfer.rdma_connection import RcConnection
from tsukimi.transfer.rdma_host import Hello, RdmaHost, RegionInfo

log = logging.getLogger(__name__)

# Work requests one connection keeps posted and not yet completed (its send-queue depth, capped by the device).
MAX_SEND_WR = 128
# Largest reply an RdmaPeer accepts for OP_RDMA_CONNECT / OP_RDMA_REGIONS.
MAX_REPLY_BYTES = 64 << 20

_STOP = object()
_FLUSHED = "IBV_WC_WR_FLUSH_ERR"


class RdmaPeer:
    """Moves slices to and from one peer over one RC queue pair, connected on demand over TCP.

    One thread posts slices (at most the QP's send-queue depth at a time; the rest wait) and polls their
    completions. A slice not complete within `timeout_s` of its submission ends TIMEOUT; a failed completion
    ends its slice FAILED with the completion status; a lost control connection or failed connect ends the
    slices FAILED. After a failure the QP is destroyed (posted work cannot be cancelled otherwise, and an RC QP
    in error flushes everything after it) and work that never ran is retried once on a new connection."""

    name = "rdma"

    def __init__(self, host: RdmaHost, address: str, secret: bytes, timeout_s: float = 10.0,
                 connect_timeout_s: float = 3.0, max_send_wr: int | None = None):
        h, port = address.rsplit(":", 1)
        self.address = (h, int(port))
        self._label = address
        self._host = host
        self._secret = secret
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_send_wr = min(max_send_wr or MAX_SEND_WR, host.device.max_qp_wr)
        self._queue: queue.Queue = queue.Queue()
        self._submit_lock = threading.Lock()
        self._closed = False
        # Owned by the worker thread:
        self._sock: socket.socket | None = None
        self._conn: RcConnection | None = None
        self._regions: dict[int, tuple[RemoteRegion, bool]] = {}
        self._regions_fresh = False
        self._pending: collections.deque[tuple[Slice, float]] = collections.deque()
        self._inflight: dict[int, tuple[Slice, float]] = {}
        self._next_wr = 1
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="transfer-rdma", daemon=True)
        self._thread.start()

    def submit(self, buffer: BufferDescriptor, slices: list[Slice]) -> None:
        """Queues `slices` (all of `buffer` of the peer); they complete on this peer's thread."""
        deadline = time.monotonic() + self._timeout_s
        with self._submit_lock:
            if not self._closed:
                self._queue.put((deadline, slices))
                return
        for piece in slices:
            piece.done(f"rdma transport to {self._label} is closed")

    def close(self) -> None:
        """Stops taking slices; those already submitted still complete (or time out), then the QP is closed."""
        with self._submit_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)

    # ---- worker thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        empty_polls = 0
        next_expiry = 0.0
        try:
            while True:
                idle = not self._pending and not self._inflight
                if idle and stopping:
                    return
                took, stop = self._take(block=idle)
                stopping = stopping or stop
                moved = done = 0
                try:
                    if took and self._conn is not None and not self._inflight and not self._control_alive():
                        # NOTE: the target closes its QP with the control connection; start afresh.
                        self._reset("", retry=True)
                    if self._pending and self._conn is None:
                        self._connect()
                    if self._pending:
                        moved = self._post()
                    if self._inflight:
                        done = self._poll()
                except (OSError, RdmaError, msgspec.MsgspecError) as exc:
                    what = "connection to" if self._conn is None else "transfer to"
                    self._fail_all(f"rdma {what} {self._label} failed: {exc}")
                    continue
                now = time.monotonic()
                if now >= next_expiry:
                    self._expire(now)
                    next_expiry = now + 0.01
                if moved or done or not self._inflight:
                    empty_polls = 0
                else:
                    empty_polls += 1
                    # NOTE: the CQ has no completion channel: poll, backing off to 1 ms while nothing completes.
                    time.sleep(0 if empty_polls < 16 else min(1e-3, 2e-5 * (empty_polls - 15)))
        except Exception as exc:  # NOTE: a bug here must fail the slices, not leave them hanging.
            log.exception("rdma transport to %s stopped", self._label)
            self._fail_all(f"rdma transport to {self._label} failed: {exc!r}")
        finally:
            self._fail_all(f"rdma transport to {self._label} is closed")
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    for piece in item[1]:
                        piece.done(f"rdma transport to {self._label} is closed")

    def _take(self, block: bool) -> tuple[bool, bool]:
        """Moves submitted slices to the pending queue: (any taken, stop seen)."""
        took = stop = False
        try:
            item = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if item is _STOP:
                    stop = True
                else:
                    deadline, slices = item
                    self._pending.extend((piece, deadline) for piece in slices)
                    took = True
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if took:
            self._regions_fresh = False
        return took, stop

    def _connect(self) -> None:
        sock = socket.create_connection(self.address, timeout=self._connect_timeout_s)
        conn = None
        try:
            wire.tune(sock)
            wire.client_handshake(sock, self._secret)
            wire.set_kernel_timeout(sock, self._timeout_s)
            with self._host.lock:
                conn = RcConnection(self._host.device, self._max_send_wr)
                mine = conn.local_info()
            hello = self._call(sock, wire.OP_RDMA_CONNECT, msgspec.msgpack.encode(mine))
            if hello.qp is None:
                raise ConnectionError("peer sent no queue pair")
            with self._host.lock:
                conn.connect(hello.qp)
        except BaseException:
            if conn is not None:
                with self._host.lock:
                    conn.close()
            sock.close()
            raise
        self._sock, self._conn = sock, conn
        self._set_regions(hello.regions)
        log.debug("rdma QP %d connected to %s QP %d", conn.qp_num, self._label, hello.qp.qp_num)

    def _call(self, sock: socket.socket, op: int, payload: bytes) -> Hello:
        self._seq += 1
        sock.sendall(wire.REQUEST.pack(op, 0, self._seq, 0, len(payload)) + payload)
        seq, status, n = wire.RESPONSE.unpack(wire.recv_exact(sock, wire.RESPONSE.size))
        if n > MAX_REPLY_BYTES:
            raise ConnectionError(f"rdma reply of {n} bytes is too large")
        body = wire.recv_exact(sock, n)
        if seq != self._seq:
            raise ConnectionError(f"response for {seq} while expecting {self._seq}")
        if status != wire.STATUS_OK:
            raise ConnectionError(f"peer refused rdma: {body.decode(errors='replace')}")
        return msgspec.msgpack.decode(body, type=Hello)

    def _set_regions(self, regions: list[RegionInfo]) -> None:
        self._regions = {r.buffer_id: (RemoteRegion(r.addr, r.rkey, r.length), r.is_writable) for r in regions}
        self._regions_fresh = True

    def _region(self, buffer_id: int) -> tuple[RemoteRegion, bool] | None:
        region = self._regions.get(buffer_id)
        if region is None and not self._regions_fresh:
            # A buffer registered after we connected: ask again (once per submission round).
            self._set_regions(self._call(self._sock, wire.OP_RDMA_REGIONS, b"").regions)
            region = self._regions.get(buffer_id)
        return region

    def _post(self) -> int:
        conn, posted = self._conn, 0
        while self._pending and len(self._inflight) < conn.max_send_wr:
            piece, deadline = self._pending.popleft()
            # NOTE: a slice carries a view of its local bytes; RDMA needs their region and offset, which its
            # request gives (the engine cuts slices contiguously from request.local_offset).
            request = piece.batch.requests[piece.index]
            mr = getattr(request.local, "mr", None)
            if mr is None:
                piece.done(f"local buffer {getattr(request.local, 'buffer_id', '?')} is not registered for rdma "
                           "(see the engine log when it was registered)")
                continue
            try:
                region = self._region(piece.buffer_id)
            except BaseException:
                self._pending.appendleft((piece, deadline))
                raise
            if region is None:
                piece.done(f"{self._label} has no buffer {piece.buffer_id} registered for rdma")
                continue
            remote, is_writable = region
            if piece.op == Op.WRITE and not is_writable:
                piece.done(f"buffer {piece.buffer_id} of {self._label} is read-only")
                continue
            offset = request.local_offset + piece.target_offset - request.target_offset
            wr_id, self._next_wr = self._next_wr, self._next_wr + 1
            try:
                with self._host.lock:
                    if piece.op == Op.WRITE:
                        conn.post_write(wr_id, mr, offset, piece.length, remote, piece.target_offset)
                    else:
                        conn.post_read(wr_id, mr, offset, piece.length, remote, piece.target_offset)
            except ValueError as exc:
                piece.done(f"rdma {piece.op.name} refused: {exc}")
                continue
            except BaseException:
                self._pending.appendleft((piece, deadline))
                raise
            self._inflight[wr_id] = (piece, deadline)
            posted += 1
        return posted

    def _poll(self) -> int:
        with self._host.lock:
            completions = self._conn.poll()
        error = ""
        for wr_id, ok, text in completions:
            entry = self._inflight.pop(wr_id, None)
            if entry is None:
                continue
            piece, deadline = entry
            if ok:
                piece.done()
            elif text.startswith(_FLUSHED):
                # Never ran (an earlier request failed and put the QP in error): retried below.
                self._inflight[wr_id] = entry
                error = error or text
            else:
                piece.done(f"rdma {piece.op.name} at {self._label} failed: {text}")
                error = text
        if error:
            self._reset(f"rdma {self._label}: connection reset after a failed request ({error})", retry=True)
        return len(completions)

    def _expire(self, now: float) -> None:
        late = [wr_id for wr_id, (_, deadline) in self._inflight.items() if deadline <= now]
        if late:
            for wr_id in late:
                piece, _ = self._inflight.pop(wr_id)
                piece.done(f"rdma {piece.op.name} at {self._label}: no completion within {self._timeout_s}s",
                           Status.TIMEOUT)
            # NOTE: posted work cannot be cancelled; destroying the QP guarantees no late DMA into buffers.
            self._reset(f"rdma {self._label}: connection reset after a request timed out", retry=True)
        while self._pending and self._pending[0][1] <= now:
            piece, _ = self._pending.popleft()
            piece.done(f"rdma {piece.op.name} at {self._label}: not started within {self._timeout_s}s",
                       Status.TIMEOUT)

    def _reset(self, error: str, retry: bool) -> None:
        """Destroys the QP and control connection. In-flight slices are retried once (`retry`), else fail."""
        inflight = list(self._inflight.values())
        self._inflight.clear()
        if self._conn is not None:
            with self._host.lock:
                self._conn.close()
            self._conn = None
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        again = []
        for piece, deadline in inflight:
            piece.attempts += 1
            if retry and piece.attempts < 2:
                again.append((piece, deadline))
            else:
                piece.done(error)
        self._pending.extendleft(reversed(again))

    def _fail_all(self, error: str) -> None:
        self._reset(error, retry=False)
        while self._pending:
            piece, _ = self._pending.popleft()
            piece.done(error)

    def _control_alive(self) -> bool:
        try:
            self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        # b"": the target closed it. NOTE: it never sends unprompted, so any data is a protocol error too.
        return False
