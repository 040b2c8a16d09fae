"""Batch transfers: requests, their status, and the slices transports move. Thread-safe, no I/O."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple


class TransferError(RuntimeError):
    """A transfer did not complete; the message says which request and why."""


class Op(enum.IntEnum):
    """Direction, from the initiator's view."""

    READ = 1
    WRITE = 2


class Status(str, enum.Enum):
    """Where a request is."""

    WAITING = "WAITING"
    PENDING = "PENDING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"

    @property
    def is_final(self) -> bool:
        # NOTE: identity, not `in (...)`: an enum's == and hash are Python-level calls, and this runs per piece.
        return self is Status.COMPLETED or self is Status.FAILED or self is Status.TIMEOUT


class TransferRequest(NamedTuple):
    """Move `length` bytes between a local registered buffer and a buffer of a target segment. (A named tuple:
    made by the thousand per second on the KV paths, at half a frozen dataclass's cost.)"""

    op: Op
    # Local registered buffer (a `LocalBuffer` of this engine).
    local: object
    local_offset: int
    # Target segment name and buffer id in it.
    segment: str
    buffer_id: int
    target_offset: int
    length: int
    # A WRITE's owner tag, for a target buffer with a write guard (see write_guard.py); 0: none.
    tag: int = 0


@dataclass(slots=True)
class RequestStatus:
    """Progress of one request."""

    status: Status = Status.WAITING
    # Bytes moved so far.
    transferred_bytes: int = 0
    # Why it failed.
    error: str = ""
    # Transport that carried it.
    transport: str = ""
    # Seconds from submission to its end.
    latency_s: float = 0.0


@dataclass
class Slice:
    """A piece of a request that one transport call moves."""

    batch: "Batch"
    index: int
    op: Op
    # View of the local bytes (source of a WRITE, destination of a READ).
    local: memoryview
    buffer_id: int
    target_offset: int
    length: int
    # Attempts made so far (a failed slice is retried once on another connection).
    attempts: int = 0
    # True once reported done (moved or failed).
    is_finished: bool = False
    # Its request's owner tag (see `TransferRequest.tag`).
    tag: int = 0

    def done(self, error: str = "", status: Status | None = None) -> None:
        self.is_finished = True
        self.batch.on_slice(self, error, status)


_batch_ids = itertools.count(1)


@dataclass
class Batch:
    """Requests submitted together; done when every request is final."""

    requests: list[TransferRequest]
    id: int = field(default_factory=lambda: next(_batch_ids))
    statuses: list[RequestStatus] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.statuses = [RequestStatus() for _ in self.requests]
        self._slices_left = [0] * len(self.requests)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._num_open = len(self.requests)
        # Called once (from any thread) when the batch is done.
        self._on_done: list = []
        if not self.requests:
            self._done.set()

    def start(self, index: int, num_slices: int, transport: str) -> None:
        """Request `index` is on its way as `num_slices` slices."""
        with self._lock:
            self._slices_left[index] = num_slices
            self.statuses[index].status = Status.PENDING
            self.statuses[index].transport = transport

    def start_many(self, counts: list[tuple[int, int]], transport: str) -> None:
        """`start` for each (index, num_slices) of `counts`, under one lock."""
        with self._lock:
            for index, num_slices in counts:
                self._slices_left[index] = num_slices
                st = self.statuses[index]
                st.status = Status.PENDING
                st.transport = transport

    def fail(self, index: int, error: str, status: Status = Status.FAILED) -> None:
        """Ends request `index` without moving it."""
        with self._lock:
            self._finish(index, status, error)

    def on_slice(self, piece: Slice, error: str, status: Status | None) -> None:
        with self._lock:
            st = self.statuses[piece.index]
            if st.status.is_final:
                return
            if error:
                self._finish(piece.index, status or Status.FAILED, error)
                return
            st.transferred_bytes += piece.length
            self._slices_left[piece.index] -= 1
            if self._slices_left[piece.index] == 0:
                self._finish(piece.index, Status.COMPLETED, "")

    def on_pieces(self, pieces: list[tuple[int, int, str]]) -> None:
        """Many pieces at once, under one lock: (request index, bytes, "" or why it failed) of each, in the order
        they ended. The same outcome as one `on_slice` per piece (the requests it completes share one latency,
        read once)."""
        with self._lock:
            statuses, left = self.statuses, self._slices_left
            latency = time.monotonic() - self.submitted_at
            num_completed = 0
            pending = Status.PENDING
            for index, length, error in pieces:
                st = statuses[index]
                # NOTE: the identity test first spares the common case the property lookup (~8 us a batch of 32).
                if st.status is not pending and st.status.is_final:
                    continue
                if error:
                    self._finish(index, Status.FAILED, error)
                    continue
                st.transferred_bytes += length
                left[index] -= 1
                if left[index] == 0:
                    st.status, st.latency_s = Status.COMPLETED, latency
                    num_completed += 1
            if num_completed:
                # NOTE: counted down once for all (`_finish` cannot reach 0 meanwhile: these were still open).
                self._close(num_completed)

    def _finish(self, index: int, status: Status, error: str) -> None:
        st = self.statuses[index]
        if st.status.is_final:
            return
        st.status, st.error = status, error
        st.latency_s = time.monotonic() - self.submitted_at
        self._close(1)

    def _close(self, num: int) -> None:
        """`num` more requests are final (under the lock); the batch is done when none is left open."""
        self._num_open -= num
        if self._num_open == 0:
            self._done.set()
            for callback in self._on_done:
                callback()

    def add_done_callback(self, callback) -> None:
        """Calls `callback()` when the batch is done (at once if it is)."""
        with self._lock:
            if not self._done.is_set():
                self._on_done.append(callback)
                return
        callback()

    @property
    def is_done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until every request is final; False on timeout."""
        return self._done.wait(timeout_s)

    def final_statuses(self) -> list[RequestStatus]:
        """Once the batch is done, its statuses themselves (final ones never change again, so no copy is needed);
        before that, a snapshot."""
        with self._lock:
            if self._num_open == 0:
                return list(self.statuses)
        return self.snapshot()

    def snapshot(self) -> list[RequestStatus]:
        with self._lock:
            return [RequestStatus(s.status, s.transferred_bytes, s.error, s.transport, s.latency_s)
                    for s in self.statuses]


def cut(batch: Batch, index: int, local: memoryview, slice_bytes: int) -> list[Slice]:
    """Slices of request `index` (whose local bytes are `local`) of at most `slice_bytes` each."""
    request = batch.requests[index]
    slices = []
    for start in range(0, request.length, slice_bytes):
        n = min(slice_bytes, request.length - start)
        slices.append(Slice(batch, index, request.op, local[start:start + n], request.buffer_id,
                            request.target_offset + start, n, tag=request.tag))
    return slices


def check_range(offset: int, length: int, size: int) -> str:
    """"" when [offset, offset + length) lies inside a buffer of `size` bytes, else why not."""
    if offset < 0 or length <= 0:
        return f"invalid range: offset {offset}, length {length}"
    if offset + length > size:
        return f"range [{offset}, {offset + length}) exceeds buffer of {size} bytes"
    return ""
