"""What a transfer engine publishes about itself: its segment, endpoints and registered buffers."""

from __future__ import annotations

import functools
import os
import socket

import msgspec


class BufferDescriptor(msgspec.Struct, frozen=True):
    """One registered buffer of a segment."""

    # Id within the segment (what requests name).
    buffer_id: int
    # Size in bytes.
    length: int
    # False when peers may only READ it.
    is_writable: bool
    # Name of its POSIX shared-memory object ("" when it is private memory: then no peer can map it).
    shm_name: str = ""
    # Name of the shared-memory table of its write guard's owner tags ("" when writes are not guarded).
    guard_shm_name: str = ""
    # Bytes per unit of that table (0 when writes are not guarded).
    guard_unit_bytes: int = 0


class SegmentDescriptor(msgspec.Struct):
    """A process's segment as its peers see it."""

    # Unique segment name.
    name: str
    # Identity of the machine: hostname and kernel boot id (peers with the same one may use shm).
    host_id: str
    # Process id (same-host peers check it is alive before using its shared memory).
    pid: int
    # "host:port" of its TCP endpoint (data and control).
    tcp_address: str
    # Transports it offers: "shm", "tcp", "rdma".
    transports: list[str]
    # Registered buffers.
    buffers: list[BufferDescriptor]
    # RDMA queue-pair details, when it offers rdma (exchanged over TCP per connection).
    rdma_device: str = ""
    # Wall-clock time of publishing; re-published on every heartbeat.
    published_at: float = 0.0
    # Increases whenever the buffer list changes.
    generation: int = 0

    def buffer(self, buffer_id: int) -> BufferDescriptor | None:
        return next((b for b in self.buffers if b.buffer_id == buffer_id), None)


@functools.cache
def local_host_id() -> str:
    """This machine's identity for same-host detection."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def default_segment_name(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}"
