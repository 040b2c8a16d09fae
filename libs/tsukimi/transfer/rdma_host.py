"""An engine's RDMA device: it registers the engine's buffers and accepts peers' queue pairs.

The target side of the RDMA transport, called from the TCP server's threads (OP_RDMA_CONNECT, OP_RDMA_REGIONS in
wire.py); `RdmaPeer` (rdma_peer.py) is the initiator side and posts on the same device.

NOTE: rdma.py is not thread-safe, and the device (one CQ, shared by all its connections) is used from the event
loop (registration), the TCP server's threads (accepting peers) and one thread per RdmaPeer; every verbs call on
it therefore holds `RdmaHost.lock`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import msgspec

from tsukimi.transfer.rdma import MemoryRegion, RdmaDevice
from tsukimi.transfer.rdma_connection import QpInfo, RcConnection


class RegionInfo(msgspec.Struct, array_like=True, frozen=True):
    """One registered buffer of the target, as its RDMA peers address it."""

    buffer_id: int
    addr: int
    rkey: int
    length: int
    is_writable: bool


class Hello(msgspec.Struct):
    """The target's reply to OP_RDMA_CONNECT (with its QP) and OP_RDMA_REGIONS (without)."""

    qp: QpInfo | None
    regions: list[RegionInfo]


# The engine's registered buffers: (buffer id, memory region, is_writable) each.
Regions = Callable[[], list[tuple[int, MemoryRegion, bool]]]


class RdmaHost:
    """An engine's RDMA device, shared by its target side (peers' QPs) and its RdmaPeers.

    Opens the device named by TSUKIMI_RDMA_DEVICE (default: the first) at the GID index TSUKIMI_RDMA_GID_INDEX
    (default 0; RoCE v2 usually needs another, see `show_gids`). Raises RdmaUnavailable with the reason when
    RDMA cannot be used here. `regions()` lists the buffers peers may reach (called from server threads)."""

    def __init__(self, regions: Regions):
        self.device = RdmaDevice(
            name=os.environ.get("TSUKIMI_RDMA_DEVICE") or None,
            gid_index=int(os.environ.get("TSUKIMI_RDMA_GID_INDEX") or 0),
        )
        self.lock = threading.Lock()
        self.max_message_size = self.device.max_message_size
        self._regions = regions

    @property
    def name(self) -> str:
        return self.device.name

    def register(self, view: memoryview, writable: bool) -> MemoryRegion:
        """Registers `view` for local use and remote READ, plus remote WRITE when `writable`. Raises ValueError
        for memory that cannot be registered (read-only or non-contiguous views), RdmaError when verbs fail."""
        with self.lock:
            return self.device.register(view, writable)

    def deregister(self, mr: MemoryRegion) -> None:
        with self.lock:
            mr.close()

    def accept(self, payload: bytes) -> tuple[bytes, Callable[[], None]]:
        """Target side of OP_RDMA_CONNECT: connects a new QP to the peer's (msgpack QpInfo in `payload`); returns
        the reply (msgpack `Hello`) and a function that closes the QP (call it when the control connection
        ends)."""
        info = msgspec.msgpack.decode(payload, type=QpInfo)
        with self.lock:
            # NOTE: the target never posts on this QP (peers READ and WRITE into it), so a send queue of 1 keeps
            # the shared CQ's budget for the initiator side.
            conn = RcConnection(self.device, max_send_wr=1)
            try:
                conn.connect(info)
            except BaseException:
                conn.close()
                raise
            mine = conn.local_info()

        def close() -> None:
            with self.lock:
                conn.close()

        return msgspec.msgpack.encode(Hello(mine, self._region_infos())), close

    def regions_reply(self) -> bytes:
        """Target side of OP_RDMA_REGIONS: the current regions (msgpack `Hello` without a QP)."""
        return msgspec.msgpack.encode(Hello(None, self._region_infos()))

    def _region_infos(self) -> list[RegionInfo]:
        return [RegionInfo(buffer_id, mr.addr, mr.rkey, mr.length, is_writable)
                for buffer_id, mr, is_writable in self._regions() if not mr.closed]

    def close(self) -> None:
        """Closes the device and everything made on it."""
        with self.lock:
            self.device.close()
