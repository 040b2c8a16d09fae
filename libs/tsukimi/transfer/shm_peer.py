"""The shared-memory transport: a peer on the same host maps the target's shared buffers and copies once."""

from __future__ import annotations

import concurrent.futures
import logging

import numpy as np

from tsukimi.transfer.batch import Op, Slice
from tsukimi.transfer.descriptor import BufferDescriptor
from tsukimi.transfer.memory import SharedRegion

log = logging.getLogger(__name__)


class ShmPeer:
    """Copies slices between local memory and a same-host peer's shared buffers (mapped once, kept)."""

    name = "shm"

    def __init__(self, executor: concurrent.futures.Executor, num_jobs: int = 2):
        self._executor = executor
        # Copies of one submission are spread over this many executor jobs (each copies its share in a loop).
        self._num_jobs = num_jobs
        self._regions: dict[str, tuple[SharedRegion, np.ndarray]] = {}

    def can_reach(self, buffer: BufferDescriptor) -> str:
        """"" when `buffer` can be mapped here, else why not."""
        if not buffer.shm_name:
            return f"buffer {buffer.buffer_id} is private memory, not shared"
        try:
            self._region(buffer)
        except (OSError, ValueError) as exc:
            return f"cannot map {buffer.shm_name}: {exc}"
        return ""

    def _region(self, buffer: BufferDescriptor) -> np.ndarray:
        entry = self._regions.get(buffer.shm_name)
        if entry is None:
            region = SharedRegion.attach(buffer.shm_name, buffer.length, writable=buffer.is_writable)
            array = np.frombuffer(region.view, dtype=np.uint8)
            entry = self._regions[buffer.shm_name] = (region, array)
        return entry[1]

    def submit(self, buffer: BufferDescriptor, slices: list[Slice]) -> None:
        target = self._region(buffer)
        num_jobs = min(self._num_jobs, len(slices))
        for job in range(num_jobs):
            self._executor.submit(self._copy_all, target, slices[job::num_jobs])

    @staticmethod
    def _copy_all(target: np.ndarray, slices: list[Slice]) -> None:
        for piece in slices:
            try:
                local = np.frombuffer(piece.local, dtype=np.uint8)
                remote = target[piece.target_offset:piece.target_offset + piece.length]
                # NOTE: numpy releases the GIL for large copies, so jobs copy in parallel on several cores.
                if piece.op == Op.WRITE:
                    np.copyto(remote, local)
                else:
                    np.copyto(local, remote)
            except Exception as exc:
                piece.done(f"shm copy failed: {exc}")
                continue
            piece.done()

    def forget(self) -> None:
        """Unmaps the peer's buffers (it restarted or re-registered)."""
        for region, _ in self._regions.values():
            region.close()
        self._regions.clear()
