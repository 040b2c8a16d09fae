"""The shared-memory transport: a peer on the same host maps the target's shared buffers and copies once.

A buffer with a write guard (see write_guard.py) has its owner table mapped too: each WRITE copy is checked
against it right before it starts."""

from __future__ import annotations

import concurrent.futures
import logging

import numpy as np

from tsukimi.transfer.batch import Batch, Op
from tsukimi.transfer.descriptor import BufferDescriptor
from tsukimi.transfer.memory import SharedRegion
from tsukimi.transfer.write_guard import TAG_BYTES, num_units, refusal

try:
    from tsukimi.transfer import _stream_copy
except ImportError:  # NOTE: the C extension is optional (setup.py); numpy's copies are the fallback.
    _stream_copy = None

log = logging.getLogger(__name__)

# A submission is split over several executor jobs only when each job gets at least this many bytes: below it,
# waking another thread costs more than the copy it would take over.
MIN_JOB_BYTES = 1 << 20
# A job reports the pieces it moved every this many bytes (and at its end), not once per piece.
REPORT_BYTES = 16 << 20
# How long the thread that copied a share inline waits for the other jobs' last copies before it leaves them to
# the event loop (one 1 MiB piece, the engine's default slice, takes ~0.1 ms at the slowest copy speeds seen).
INLINE_WAIT_S = 0.002
# Copies of a length in [_MISALIGNED_MIN, _MISALIGNED_MAX) whose source and destination are not aligned alike
# (mod 64) go through a ufunc (see `copy_bytes`).
_MISALIGNED_MIN, _MISALIGNED_MAX = 4096, 1 << 20

# One copy: (request index, op, the local buffer's bytes as a uint8 array, offset there, offset in the target
# buffer, length).
Copy = tuple[int, Op, np.ndarray, int, int, int]


def copy_bytes(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[:] = src for equal-length uint8 arrays, at memory speed whatever their alignment.

    With the C extension, every copy is one call into it (the GIL released): streaming stores from
    `_stream_copy.STREAM_MIN_BYTES` (64 KiB) up, since the other process reads the bytes, not this core, and
    glibc's memcpy would first read every destination line into the cache (measured: 256 KiB copies 1.5-1.8x
    faster, see `_stream_copy.c`); below that, memcpy, or a SIMD loop for a misaligned pair (see the pitfall).
    PITFALL (without the extension): `np.copyto` is a memmove, and glibc's memmove uses REP MOVSB from ~2 KiB up
    to a threshold (the L2 size on AMD), which on some CPUs runs several times slower when the destination is not
    aligned like the source mod 64 (measured on an AMD EPYC: 256 KiB from shm, page-aligned, into a numpy array,
    which malloc puts 16 bytes past a page: 1.5-2.8 GB/s instead of 7). The uint8 `positive` ufunc is a plain
    SIMD loop that does not care, and releases the GIL like `copyto`. Above ~1 MiB memmove switches to
    non-temporal stores, faster than the ufunc when both cores copy: it keeps those.
    """
    if _stream_copy is not None:
        _stream_copy.copy(dst, src)
        return
    n = len(src)
    if _MISALIGNED_MIN <= n < _MISALIGNED_MAX and (dst.__array_interface__["data"][0]
                                                   - src.__array_interface__["data"][0]) % 64:
        np.positive(src, out=dst)
    else:
        np.copyto(dst, src)


class ShmPeer:
    """Copies requests' bytes between local memory and a same-host peer's shared buffers (mapped once, kept)."""

    name = "shm"

    def __init__(self, executor: concurrent.futures.Executor, num_jobs: int = 2, inline_bytes: int = 0):
        self._executor = executor
        # Copies of one submission are spread over at most this many jobs (each copies its share in a loop).
        self._num_jobs = num_jobs
        # A share of at most this many bytes is copied by the submitting thread itself (0: every share goes to the
        # executor).
        self._inline_bytes = inline_bytes
        self._regions: dict[str, tuple[SharedRegion, np.ndarray]] = {}
        # Owner tables of guarded buffers, by the table's shm name: (region, its tags as a 'Q' memoryview).
        self._guards: dict[str, tuple[SharedRegion, memoryview]] = {}

    def can_reach(self, buffer: BufferDescriptor) -> str:
        """"" when `buffer` can be mapped here, else why not."""
        if not buffer.shm_name:
            return f"buffer {buffer.buffer_id} is private memory, not shared"
        try:
            self._region(buffer)
            self._guard(buffer)
        except (OSError, ValueError) as exc:
            return f"cannot map {buffer.shm_name} (or its write guard): {exc}"
        return ""

    def _region(self, buffer: BufferDescriptor) -> np.ndarray:
        entry = self._regions.get(buffer.shm_name)
        if entry is None:
            region = SharedRegion.attach(buffer.shm_name, buffer.length, writable=buffer.is_writable)
            array = np.frombuffer(region.view, dtype=np.uint8)
            entry = self._regions[buffer.shm_name] = (region, array)
        return entry[1]

    def _guard(self, buffer: BufferDescriptor) -> tuple[memoryview, int] | None:
        """(owner tags, unit bytes) of `buffer`'s write guard, mapped read-only; None when it has none."""
        if not buffer.guard_shm_name:
            return None
        entry = self._guards.get(buffer.guard_shm_name)
        if entry is None:
            region = SharedRegion.attach(buffer.guard_shm_name,
                                         num_units(buffer.length, buffer.guard_unit_bytes) * TAG_BYTES, writable=False)
            entry = self._guards[buffer.guard_shm_name] = (region, region.view.cast("Q"))
        return entry[1], buffer.guard_unit_bytes

    def submit_copies(self, buffer: BufferDescriptor, batch: Batch, copies: list[Copy], num_bytes: int) -> None:
        """Copies `copies` of `batch` in one job, or `num_jobs` when there are bytes enough for each; the jobs
        take the copies one at a time from a shared queue (they end together whatever each copy's speed) and each
        reports what it moved to the batch in one call (per `REPORT_BYTES`). The jobs run on the executor, except
        that when a job's share is at most `inline_bytes` the calling thread runs one itself, after handing out
        the others, and then waits for them (each is on its last copy by then): no thread to wake for that share,
        nor an event loop to wake at the end."""
        target = self._region(buffer)
        guard = self._guard(buffer)
        num_jobs = max(1, min(self._num_jobs, len(copies), num_bytes // MIN_JOB_BYTES))
        # NOTE: one list iterator shared by the jobs: its next() is atomic under the GIL.
        work = iter(copies)
        is_inline = num_bytes <= self._inline_bytes * num_jobs
        for _ in range(num_jobs - 1 if is_inline else num_jobs):
            self._executor.submit(self._copy_many, target, batch, work, guard)
        if is_inline:
            self._copy_many(target, batch, work, guard)
            if num_jobs > 1:
                # NOTE: bounded: a job still copying then is waited for through the event loop (engine.wait).
                batch.wait(INLINE_WAIT_S)

    @staticmethod
    def _copy_many(target: np.ndarray, batch: Batch, copies, guard: tuple[memoryview, int] | None = None) -> None:
        done: list[tuple[int, int, str]] = []
        pending = 0
        write = Op.WRITE
        requests = batch.requests
        for index, op, local, local_offset, target_offset, length in copies:
            if guard is not None and op == write:
                # NOTE: right before the copy; write_guard.py says what race remains.
                problem = refusal(guard[0], guard[1], target_offset, length, requests[index].tag)
                if problem:
                    done.append((index, length, problem))
                    continue
            try:
                # NOTE: the copy releases the GIL, so jobs copy in parallel on several cores.
                if _stream_copy is not None:
                    if op == write:
                        _stream_copy.copy_at(target, target_offset, local, local_offset, length)
                    else:
                        _stream_copy.copy_at(local, local_offset, target, target_offset, length)
                elif op == write:
                    copy_bytes(target[target_offset:target_offset + length],
                               local[local_offset:local_offset + length])
                else:
                    copy_bytes(local[local_offset:local_offset + length],
                               target[target_offset:target_offset + length])
                done.append((index, length, ""))
            except Exception as exc:
                done.append((index, length, f"shm copy failed: {exc}"))
            pending += length
            if pending >= REPORT_BYTES:
                batch.on_pieces(done)
                done, pending = [], 0
        if done:
            batch.on_pieces(done)

    def forget(self) -> None:
        """Unmaps the peer's buffers (it restarted or re-registered)."""
        for region, _ in self._regions.values():
            region.close()
        self._regions.clear()
        for region, tags in self._guards.values():
            tags.release()
            region.close()
        self._guards.clear()
