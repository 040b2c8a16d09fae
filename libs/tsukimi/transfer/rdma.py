"""RDMA transport of the transfer engine: one-sided RDMA WRITE/READ over reliable-connected QPs via pyverbs.

pyverbs is rdma-core's Python binding. It is optional and imported lazily, so this module always imports;
`probe()` says whether RDMA can be used here and why not. Getting pyverbs:
- Debian/Ubuntu: `apt-get install python3-pyverbs` (system Python only: a venv needs
  `--system-site-packages`). Debian 12 ships rdma-core 44.
- PyPI: `pip install pyverbs` builds rdma-core from an sdist; it needs cmake, a C compiler and the libnl-3,
  libnl-route-3 and libudev development headers, and at run time libibverbs1 and ibverbs-providers.
- A device: real hardware, or SoftRoCE over any Ethernet interface (`rdma link add rxe0 type rxe netdev eth0`,
  which needs the kernel's rdma_rxe module).

This module opens the device (`RdmaDevice`) and registers memory (`MemoryRegion`); rdma_connection.py holds the
queue pairs. Peers exchange `QpInfo` and `RemoteRegion` over the engine's TCP control connection, then move
bytes with `RcConnection.post_write` / `post_read` and reap completions with `RcConnection.poll`. An RDMA
WRITE raises no event at its target: the writer tells the peer over the control connection once its completions
are in.
Nothing here is thread-safe: the engine drives a device and its connections from one thread.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

SYSFS_DEVICES = Path("/sys/class/infiniband")

# Outstanding RDMA READs per QP, further capped by the device.
_RD_ATOMIC = 16


class RdmaUnavailable(RuntimeError):
    """RDMA cannot be used on this machine: no pyverbs, no device, or the device/port cannot be opened."""


class RdmaError(RuntimeError):
    """A verbs operation failed on an opened device (connect, post, poll), or the object is closed."""


@dataclass(frozen=True)
class RemoteRegion:
    """A peer's registered memory as the target of our WRITEs and the source of our READs."""

    addr: int
    rkey: int
    length: int


def _load() -> SimpleNamespace:
    """The pyverbs names this module uses; raises ImportError without pyverbs."""
    root = logging.getLogger()
    # NOTE: importing pyverbs.base calls logging.basicConfig(); a root handler present then makes it a no-op.
    guard = None if root.handlers else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    try:
        device = importlib.import_module("pyverbs.device")
        addr = importlib.import_module("pyverbs.addr")
        cq = importlib.import_module("pyverbs.cq")
        mr = importlib.import_module("pyverbs.mr")
        pd = importlib.import_module("pyverbs.pd")
        qp = importlib.import_module("pyverbs.qp")
        wr = importlib.import_module("pyverbs.wr")
        errors = importlib.import_module("pyverbs.pyverbs_error")
        try:
            enums = importlib.import_module("pyverbs.libibverbs_enums")
        except ImportError:
            # NOTE: older rdma-core (e.g. Debian 12's 44) names the enum module pyverbs.enums.
            enums = importlib.import_module("pyverbs.enums")
    finally:
        if guard is not None:
            root.removeHandler(guard)
    return SimpleNamespace(
        Context=device.Context,
        get_device_list=device.get_device_list,
        GID=addr.GID,
        GlobalRoute=addr.GlobalRoute,
        AHAttr=addr.AHAttr,
        CQ=cq.CQ,
        MR=mr.MR,
        PD=pd.PD,
        QP=qp.QP,
        QPCap=qp.QPCap,
        QPInitAttr=qp.QPInitAttr,
        QPAttr=qp.QPAttr,
        SGE=wr.SGE,
        SendWR=wr.SendWR,
        Error=errors.PyverbsError,
        e=enums,
    )


def probe() -> tuple[bool, str]:
    """(available, reason): whether an RDMA device exists and pyverbs imports and lists it. Never raises."""
    # NOTE: the device is checked first: without one, whether pyverbs is installed does not matter.
    try:
        if not SYSFS_DEVICES.is_dir() or not any(SYSFS_DEVICES.iterdir()):
            return False, f"no RDMA device: {SYSFS_DEVICES} is empty or missing"
    except OSError as exc:
        return False, f"no RDMA device: cannot read {SYSFS_DEVICES}: {exc}"
    try:
        v = _load()
    except ModuleNotFoundError as exc:
        return False, f"pyverbs not installed: {exc}"
    except Exception as exc:
        # NOTE: e.g. a pyverbs built against another rdma-core than the system's libibverbs (private ABI).
        return False, f"pyverbs failed to load: {exc!r}"
    try:
        names = [d.name.decode() for d in v.get_device_list()]
    except Exception as exc:
        return False, f"cannot list RDMA devices: {exc}"
    if not names:
        return False, "no RDMA device: libibverbs lists none (is ibverbs-providers installed?)"
    return True, "RDMA devices: " + ", ".join(names)


def gid_value(gid: str) -> int:
    """A GID's 128 bits as an int (0: no GID)."""
    return int(gid.replace(":", ""), 16)


def _flat_view(buffer) -> tuple[memoryview, int]:
    """A flat byte view of a writable, C-contiguous, non-empty buffer, and its start address."""
    view = memoryview(buffer)
    if view.readonly:
        raise ValueError("buffer is read-only")
    if not view.c_contiguous:
        raise ValueError("buffer is not C-contiguous")
    flat = view.cast("B")
    if flat.nbytes == 0:
        raise ValueError("buffer is empty")
    return flat, ctypes.addressof(ctypes.c_char.from_buffer(flat))


class RdmaDevice:
    """One opened device + protection domain + completion queue, shared by the connections made on it."""

    def __init__(self, name: str | None = None, port: int = 1, gid_index: int = 0, cq_depth: int = 4096):
        """Opens `name` (default: the first device), checks that `port` is active and reads its GID at
        `gid_index`. Raises RdmaUnavailable with the reason otherwise."""
        available, reason = probe()
        if not available:
            raise RdmaUnavailable(reason)
        self._v = v = _load()
        try:
            names = [d.name.decode() for d in v.get_device_list()]
            self.name = name if name is not None else names[0]
            if self.name not in names:
                raise RdmaUnavailable(f"no RDMA device {self.name!r}; present: {', '.join(names)}")
            self._ctx = v.Context(name=self.name)
        except v.Error as exc:
            raise RdmaUnavailable(f"cannot open RDMA device {name or '(first)'}: {exc}") from exc
        try:
            attr = self._ctx.query_device()
            port_attr = self._ctx.query_port(port)
            if port_attr.state != v.e.IBV_PORT_ACTIVE:
                raise RdmaUnavailable(f"{self.name} port {port} is not active (state {port_attr.state})")
            self.port = port
            self.gid_index = gid_index
            self.gid = str(self._ctx.query_gid(port, gid_index))
            if port_attr.link_layer == v.e.IBV_LINK_LAYER_ETHERNET and not gid_value(self.gid):
                raise RdmaUnavailable(
                    f"{self.name} port {port} has no GID at index {gid_index} (RoCE needs one)"
                )
            self.lid = int(port_attr.lid)
            self.active_mtu = int(port_attr.active_mtu)
            self.max_message_size = int(port_attr.max_msg_sz)
            self.max_qp_wr = int(attr.max_qp_wr)
            self.max_rd_atomic = min(_RD_ATOMIC, int(attr.max_qp_init_rd_atom))
            self.max_dest_rd_atomic = min(_RD_ATOMIC, int(attr.max_qp_rd_atom))
            self.cq_depth = min(cq_depth, int(attr.max_cqe))
            self._pd = v.PD(self._ctx)
            self._cq = v.CQ(self._ctx, self.cq_depth, None, None, 0)
        except BaseException as exc:
            self._ctx.close()
            if isinstance(exc, v.Error):
                raise RdmaUnavailable(f"cannot set up {self.name} port {port}: {exc}") from exc
            raise
        # Completion-queue entries promised to connections: the sum of their send-queue depths.
        self._cq_reserved = 0
        # Completions reaped from the shared CQ, per QP number, until that QP's connection polls.
        self._completions: dict[int, deque[tuple[int, bool, str]]] = {}
        self.closed = False

    def register(self, buffer, writable: bool) -> MemoryRegion:
        """Registers `buffer` (writable, C-contiguous: bytearray, mmap, numpy array, `tensor.numpy()`) for
        local use and remote READ, plus remote WRITE when `writable`. The buffer stays exported (a bytearray
        cannot be resized, an mmap not closed) until the region is closed."""
        self._check_open()
        flat, addr = _flat_view(buffer)
        e = self._v.e
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
        if writable:
            access |= e.IBV_ACCESS_REMOTE_WRITE
        try:
            mr = self._v.MR(self._pd, flat.nbytes, access, address=addr)
        except self._v.Error as exc:
            flat.release()
            raise RdmaError(f"cannot register {flat.nbytes} bytes: {exc}") from exc
        return MemoryRegion(self, mr, flat, addr)

    def close(self) -> None:
        """Releases the device and every verbs object made on it (regions and connections not closed yet)."""
        if not self.closed:
            self.closed = True
            self._completions.clear()
            self._ctx.close()

    def _check_open(self) -> None:
        # NOTE: pyverbs objects dereference their C pointer unchecked, so a call after close would crash.
        if self.closed:
            raise RdmaError(f"RDMA device {self.name} is closed")

    def _reap(self, qp_num: int, max_entries: int) -> list[tuple[int, bool, str]]:
        """Up to `max_entries` completions of QP `qp_num`, keeping those of other QPs for their owners."""
        self._check_open()
        try:
            _, wcs = self._cq.poll(max_entries)
        except self._v.Error as exc:
            raise RdmaError(f"polling the completion queue failed: {exc}") from exc
        for wc in wcs:
            ok = wc.status == self._v.e.IBV_WC_SUCCESS
            text = "success" if ok else f"{self._status_name(wc.status)} (vendor error {wc.vendor_err:#x})"
            queue = self._completions.get(wc.qp_num)
            if queue is not None:
                queue.append((wc.wr_id, ok, text))
        queue = self._completions[qp_num]
        return [queue.popleft() for _ in range(min(max_entries, len(queue)))]

    def _status_name(self, status: int) -> str:
        try:
            return self._v.e.ibv_wc_status(status).name
        except ValueError:
            return f"work completion status {status}"


class MemoryRegion:
    """A registered buffer: `addr`, `length`, and the keys local (`lkey`) and remote (`rkey`) access use."""

    def __init__(self, device: RdmaDevice, mr, view: memoryview, addr: int):
        self.device = device
        self._mr = mr
        self._view = view
        self.addr = addr
        self.length = view.nbytes
        self.lkey = int(mr.lkey)
        self.rkey = int(mr.rkey)
        self.closed = False

    def remote(self) -> RemoteRegion:
        """What a peer needs to WRITE into or READ from this region."""
        return RemoteRegion(addr=self.addr, rkey=self.rkey, length=self.length)

    def close(self) -> None:
        """Deregisters the region and releases the buffer."""
        if not self.closed:
            self.closed = True
            self._mr.close()
            self._view.release()
