"""The buffers a transfer engine registered: each one's bytes and how peers reach them, and the registry by id."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from tsukimi.transfer.descriptor import BufferDescriptor
from tsukimi.transfer.memory import SharedRegion
from tsukimi.transfer.rdma import MemoryRegion, RdmaError
from tsukimi.transfer.rdma_host import RdmaHost
from tsukimi.transfer.write_guard import WriteGuard

log = logging.getLogger(__name__)


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


class Buffers:
    """An engine's registered buffers by id (`by_id`), registered for rdma too when the engine offers it;
    `generation` grows whenever they change (peers then choose their transports again)."""

    def __init__(self, rdma: RdmaHost | None):
        self.by_id: dict[int, LocalBuffer] = {}
        self.generation = 0
        self._next_buffer_id = 1
        self._rdma = rdma

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, buffer: LocalBuffer) -> LocalBuffer:
        """Gives `buffer` the next id and registers it (for rdma as well, when it can be)."""
        buffer.buffer_id = self._next_buffer_id
        self._next_buffer_id += 1
        if self._rdma is not None:
            try:
                buffer.mr = self._rdma.register(buffer.view, buffer.is_writable)
            except (ValueError, RdmaError) as exc:
                # NOTE: e.g. read-only memory (bytes): it stays reachable over shm/tcp, rdma refuses it.
                log.warning("buffer %d is not registered for rdma: %s", buffer.buffer_id, exc)
        self.by_id[buffer.buffer_id] = buffer
        self.generation += 1
        return buffer

    def guard(self, buffer: LocalBuffer, unit_bytes: int) -> WriteGuard:
        """The buffer's write guard (made on the first call, and withdrawn from rdma)."""
        if buffer.guard is None:
            buffer.guard = WriteGuard(buffer.length, unit_bytes)
            if buffer.mr is not None:
                # NOTE: withdrawn from rdma peers too, whose writes it could not check.
                self._rdma.deregister(buffer.mr)
                buffer.mr = None
            self.generation += 1
        return buffer.guard

    def remove(self, buffer: LocalBuffer) -> None:
        """Withdraws a buffer and closes what it holds."""
        if self.by_id.pop(buffer.buffer_id, None) is not None:
            self.generation += 1
            if buffer.mr is not None:
                self._rdma.deregister(buffer.mr)
            if buffer.region is not None:
                buffer.region.close()
            if buffer.guard is not None:
                buffer.guard.close()

    def close(self) -> None:
        """Closes every buffer's registration, shared memory and guard, and forgets them."""
        for buffer in self.by_id.values():
            if buffer.mr is not None:
                self._rdma.deregister(buffer.mr)
            if buffer.region is not None:
                buffer.region.close()
            if buffer.guard is not None:
                buffer.guard.close()
        self.by_id.clear()

    def lookup(self, buffer_id: int) -> tuple[memoryview, bool, WriteGuard | None] | None:
        """(view, is writable, guard) of a buffer, for the TCP server; None when unknown."""
        buffer = self.by_id.get(buffer_id)
        return (buffer.view, buffer.is_writable, buffer.guard) if buffer else None

    def rdma_regions(self) -> list[tuple[int, MemoryRegion, bool]]:
        """(buffer id, memory region, is writable) of each buffer registered for rdma."""
        # NOTE: called from the TCP server's threads; list() copies the values in one step under the GIL.
        return [(b.buffer_id, b.mr, b.is_writable) for b in list(self.by_id.values()) if b.mr is not None]

    def descriptors(self) -> list[BufferDescriptor]:
        """The buffers as the engine's descriptor lists them."""
        return [BufferDescriptor(b.buffer_id, b.length, b.is_writable, b.region.name if b.region else "",
                                 b.guard.region.name if b.guard else "", b.guard.unit_bytes if b.guard else 0)
                for b in self.by_id.values()]
