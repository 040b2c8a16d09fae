"""RDMA transport: availability reporting, bounds checks and the glue over in-process stand-ins for pyverbs
run everywhere; a real two-QP loopback runs where a device exists.

The loopback tests run on any machine with pyverbs and an active RDMA port, e.g. SoftRoCE:
`rdma link add rxe0 type rxe netdev eth0`. TSUKIMI_RDMA_DEVICE and TSUKIMI_RDMA_GID_INDEX pick the device
and GID index (default: the first device, index 0).
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import mmap
import os
import sys
import time
import types
from collections import deque
from contextlib import closing

import msgspec
import pytest

from tsukimi.transfer import rdma
from tsukimi.transfer.rdma import RdmaDevice, RdmaError, RdmaUnavailable, RemoteRegion, probe
from tsukimi.transfer.rdma_connection import QpInfo, RcConnection, check_bounds

AVAILABLE, REASON = probe()
needs_rdma = pytest.mark.skipif(not AVAILABLE, reason=REASON)
needs_no_rdma = pytest.mark.skipif(AVAILABLE, reason="this machine has an RDMA device")


@needs_no_rdma
def test_probe_reports_why_rdma_is_unavailable():
    assert probe() == (False, REASON)
    assert isinstance(REASON, str) and REASON.strip()


@needs_no_rdma
def test_device_raises_rdma_unavailable_with_the_probe_reason():
    with pytest.raises(RdmaUnavailable) as raised:
        RdmaDevice()
    assert str(raised.value) == REASON


def test_probe_without_pyverbs(monkeypatch, tmp_path):
    (tmp_path / "mlx5_0").mkdir()  # a device is present: the missing binding is the reason
    monkeypatch.setattr(rdma, "SYSFS_DEVICES", tmp_path)
    for name in [name for name in sys.modules if name.startswith("pyverbs.")] + ["pyverbs"]:
        monkeypatch.setitem(sys.modules, name, None)
    available, reason = probe()
    assert not available
    assert reason.startswith("pyverbs not installed: ")


def _fake_pyverbs(monkeypatch, get_device_list):
    """pyverbs modules whose device list comes from `get_device_list`, every other name a dummy."""

    class Module(types.ModuleType):
        def __getattr__(self, name):
            return object

    for name in ("device", "addr", "cq", "mr", "pd", "qp", "wr", "pyverbs_error", "libibverbs_enums"):
        monkeypatch.setitem(sys.modules, f"pyverbs.{name}", Module(f"pyverbs.{name}"))
    monkeypatch.setitem(sys.modules, "pyverbs", Module("pyverbs"))
    sys.modules["pyverbs.device"].get_device_list = get_device_list


def test_probe_with_empty_sysfs(monkeypatch, tmp_path):
    # No device: that is the reason, whatever the state of pyverbs.
    monkeypatch.setattr(rdma, "_load", lambda: pytest.fail("pyverbs must not be needed to see there is no device"))
    monkeypatch.setattr(rdma, "SYSFS_DEVICES", tmp_path)
    assert probe() == (False, f"no RDMA device: {tmp_path} is empty or missing")
    monkeypatch.setattr(rdma, "SYSFS_DEVICES", tmp_path / "missing")
    assert probe() == (False, f"no RDMA device: {tmp_path / 'missing'} is empty or missing")


def test_probe_when_listing_devices_fails_or_finds_none(monkeypatch, tmp_path):
    (tmp_path / "rxe0").mkdir()
    monkeypatch.setattr(rdma, "SYSFS_DEVICES", tmp_path)

    def failing():
        raise RuntimeError("Failed to get devices list")

    _fake_pyverbs(monkeypatch, failing)
    assert probe() == (False, "cannot list RDMA devices: Failed to get devices list")
    _fake_pyverbs(monkeypatch, lambda: [])
    available, reason = probe()
    assert not available and reason.startswith("no RDMA device: libibverbs lists none")
    _fake_pyverbs(monkeypatch, lambda: [types.SimpleNamespace(name=b"rxe0")])
    assert probe() == (True, "RDMA devices: rxe0")


@pytest.mark.parametrize(
    "error",
    [
        ImportError("libibverbs.so.1: version `IBVERBS_PRIVATE_59' not found"),
        OSError("libibverbs.so.1: cannot open shared object file"),
    ],
)
def test_probe_when_loading_pyverbs_fails_otherwise(monkeypatch, tmp_path, error):
    (tmp_path / "mlx5_0").mkdir()
    monkeypatch.setattr(rdma, "SYSFS_DEVICES", tmp_path)

    def broken():
        raise error

    monkeypatch.setattr(rdma, "_load", broken)
    assert probe() == (False, f"pyverbs failed to load: {error!r}")


def test_importing_pyverbs_leaves_logging_unconfigured(monkeypatch):
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])

    class Module(types.ModuleType):
        def __getattr__(self, name):
            return object

    def configuring_import(name):
        logging.basicConfig(level=logging.INFO)
        return Module(name)

    monkeypatch.setattr(rdma.importlib, "import_module", configuring_import)
    rdma._load()
    assert root.handlers == []


# check_bounds(offset, length, region_length, remote_offset, remote_length, max_message)
@pytest.mark.parametrize(
    "args",
    [
        (0, 1, 1, 0, 1, 1),
        (0, 100, 100, 0, 100, 100),
        (99, 1, 100, 49, 50, 1),
        (0, 2, 2, (1 << 64) - 2, 1 << 64, 2),
        (10, 90, 100, 0, 90, 90),
        (0, 1 << 30, 1 << 31, (1 << 40) - (1 << 30), 1 << 40, 1 << 30),
    ],
)
def test_check_bounds_accepts_ranges_inside_both_regions(args):
    check_bounds(*args)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0, 100, 0, 100, 100), "length must be positive, got 0"),
        ((0, -1, 100, 0, 100, 100), "length must be positive, got -1"),
        ((0, 101, 200, 0, 200, 100), "length 101 exceeds the device's max message size 100"),
        ((1, 100, 100, 0, 100, 100), "local range [1, 101) is outside the region of 100 bytes"),
        ((100, 1, 100, 0, 100, 100), "local range [100, 101) is outside the region of 100 bytes"),
        ((-1, 1, 100, 0, 100, 100), "local range [-1, 0) is outside the region of 100 bytes"),
        ((0, 10, 100, 91, 100, 100), "remote range [91, 101) is outside the region of 100 bytes"),
        ((0, 10, 100, -5, 100, 100), "remote range [-5, 5) is outside the region of 100 bytes"),
        ((0, 1, 0, 0, 1, 1), "local range [0, 1) is outside the region of 0 bytes"),
        ((1 << 64, 1, 1 << 64, 0, 1, 1), "local range [18446744073709551616, 18446744073709551617)"),
        ((0, 2, 2, (1 << 64) - 1, 1 << 64, 2), "remote range [18446744073709551615, 18446744073709551617)"),
    ],
)
def test_check_bounds_refuses_ranges_outside_a_region(args, message):
    with pytest.raises(ValueError) as raised:
        check_bounds(*args)
    assert str(raised.value).startswith(message)


def test_flat_view_of_a_bytearray_points_at_its_bytes():
    buffer = bytearray(b"abcdef")
    view, addr = rdma._flat_view(buffer)
    assert view.nbytes == 6
    assert ctypes.string_at(addr, 6) == b"abcdef"
    with pytest.raises(BufferError):
        buffer.extend(b"g")
    view.release()
    buffer.extend(b"g")


def test_flat_view_of_a_typed_array_and_an_mmap():
    np = pytest.importorskip("numpy")
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    view, addr = rdma._flat_view(array)
    assert (view.nbytes, addr) == (48, array.ctypes.data)
    view.release()
    with mmap.mmap(-1, 4096) as region:
        view, addr = rdma._flat_view(region)
        assert view.nbytes == 4096
        view.release()


@pytest.mark.parametrize(
    "buffer, message",
    [
        (b"read-only", "buffer is read-only"),
        (memoryview(bytearray(8))[::2], "buffer is not C-contiguous"),
        (bytearray(), "buffer is empty"),
    ],
)
def test_flat_view_refuses_unregistrable_buffers(buffer, message):
    with pytest.raises(ValueError, match=message):
        rdma._flat_view(buffer)


def test_exchanged_descriptors_round_trip_through_json():
    info = QpInfo(
        lid=0,
        qp_num=0x11,
        psn=0xABCDEF,
        gid="fe80:0000:0000:0000:0250:56ff:fe9a:1234",
        port=1,
        gid_index=1,
        mtu=3,
    )
    region = RemoteRegion(addr=0x7F00_0000_1000, rkey=0x1234, length=1 << 20)
    assert msgspec.json.decode(msgspec.json.encode(info), type=QpInfo) == info
    assert msgspec.json.decode(msgspec.json.encode(region), type=RemoteRegion) == region


class _WcStatus(enum.IntEnum):
    IBV_WC_SUCCESS = 0
    IBV_WC_WR_FLUSH_ERR = 5
    IBV_WC_REM_ACCESS_ERR = 10


def _fake_verbs() -> types.SimpleNamespace:
    """In-process stand-ins, with pyverbs' signatures, for the calls rdma.py makes: an RC QP moves bytes
    with memmove and completes into its CQ, so the glue logic runs where no device exists."""
    regions: dict[int, tuple[int, int, int]] = {}
    qps: dict = {}
    keys = itertools.count(0x100)
    work: list = []

    def record(**fields):
        return types.SimpleNamespace(**fields)

    def QPCap(max_send_wr=1, max_recv_wr=10, max_send_sge=1, max_recv_sge=1, max_inline_data=0):
        return record(max_send_wr=max_send_wr)

    def QPInitAttr(qp_type=4, qp_context=None, scq=None, rcq=None, srq=None, cap=None, sq_sig_all=1):
        assert qp_type == 2 and scq is rcq and sq_sig_all == 1
        return record(scq=scq, cap=cap)

    def QPAttr(qp_state=1, cur_qp_state=0, port_num=1, path_mtu=3):
        return record(port_num=port_num, path_mtu=path_mtu)

    def AHAttr(dlid=0, sl=0, src_path_bits=0, static_rate=0, is_global=0, port_num=1, gr=None):
        assert bool(is_global) == (gr is not None)
        return record(dlid=dlid, gr=gr)

    def GlobalRoute(dgid=None, flow_label=0, sgid_index=0, hop_limit=1, traffic_class=0):
        return record(dgid=dgid, sgid_index=sgid_index)

    class Context:
        def __init__(self, **kwargs):
            self.name = kwargs["name"]

        def query_device(self):
            return record(max_qp_wr=1024, max_qp_init_rd_atom=8, max_qp_rd_atom=8, max_cqe=512)

        def query_port(self, port_num):
            return record(state=4, lid=0, active_mtu=5, max_msg_sz=1 << 16, link_layer=2)

        def query_gid(self, port_num, index):
            return "fe80:0000:0000:0000:0000:0000:0000:0001"

        def close(self):
            for qp in list(qps.values()):
                qp.close()

    class CQ:
        def __init__(self, context, cqe, cq_context=None, channel=None, comp_vector=0):
            self.cqe = cqe
            self.wcs: deque = deque()

        def poll(self, num_entries=1):
            wcs = [self.wcs.popleft() for _ in range(min(num_entries, len(self.wcs)))]
            return len(wcs), wcs

    class MR:
        def __init__(self, creator, length=0, access=0, address=None, implicit=False, **kwargs):
            self.lkey = self.rkey = next(keys)
            regions[self.rkey] = (address, length, access)

        def close(self):
            regions.pop(self.rkey, None)

    class QP:
        def __init__(self, creator, init_attr, qp_attr=None):
            self.qp_num = next(keys)
            self.cq = init_attr.scq
            self.depth = init_attr.cap.max_send_wr
            self.access = qp_attr.qp_access_flags
            self.state = "INIT"
            qps[self.qp_num] = self

        def to_rtr(self, qp_attr):
            assert self.state == "INIT" and qp_attr.path_mtu == 5 and qp_attr.ah_attr.gr.sgid_index == 0
            self.peer, self.rq_psn, self.state = qps[qp_attr.dest_qp_num], qp_attr.rq_psn, "RTR"

        def to_rts(self, qp_attr):
            assert self.state == "RTR"
            self.sq_psn, self.state = qp_attr.sq_psn, "RTS"

        def post_send(self, wr):
            assert self.state in ("RTS", "ERR") and len(self.cq.wcs) < self.cq.cqe
            addr, length, access = regions.get(wr.rkey, (0, 0, 0))
            needed = 2 if wr.opcode == 0 else 4
            status = 5 if self.state == "ERR" else 0
            if not status and (
                not access & needed & self.peer.access or wr.remote + wr.length > addr + length
            ):
                status, self.state = 10, "ERR"
            if not status:
                source, target = (wr.local, wr.remote) if wr.opcode == 0 else (wr.remote, wr.local)
                ctypes.memmove(target, source, wr.length)
            self.cq.wcs.append(record(wr_id=wr.wr_id, status=status, qp_num=self.qp_num, vendor_err=0))

        def close(self):
            qps.pop(self.qp_num, None)

    class Freed:
        def close(self):
            assert not self.freed, "freed twice"
            self.freed = True

    class SGE(Freed):
        def __init__(self, addr, length, lkey):
            assert lkey in regions
            self.addr, self.length, self.freed = addr, length, False
            work.append(self)

    class SendWR(Freed):
        def __init__(self, wr_id=0, opcode=2, num_sge=0, imm_data=0, sg=None, send_flags=2, next_wr=None):
            [sge] = sg
            assert num_sge == 1 and send_flags == 2 and not sge.freed
            self.wr_id, self.opcode, self.local, self.length, self.freed = (
                wr_id,
                opcode,
                sge.addr,
                sge.length,
                False,
            )
            work.append(self)

        def set_wr_rdma(self, rkey, addr):
            self.rkey, self.remote = rkey, addr

    e = types.SimpleNamespace(
        IBV_PORT_ACTIVE=4,
        IBV_LINK_LAYER_ETHERNET=2,
        IBV_ACCESS_LOCAL_WRITE=1,
        IBV_ACCESS_REMOTE_WRITE=2,
        IBV_ACCESS_REMOTE_READ=4,
        IBV_QPT_RC=2,
        IBV_WR_RDMA_WRITE=0,
        IBV_WR_RDMA_READ=4,
        IBV_SEND_SIGNALED=2,
        IBV_WC_SUCCESS=0,
        ibv_wc_status=_WcStatus,
    )
    return types.SimpleNamespace(
        Context=Context,
        get_device_list=lambda: [types.SimpleNamespace(name=b"fake0")],
        GID=str,
        GlobalRoute=GlobalRoute,
        AHAttr=AHAttr,
        CQ=CQ,
        MR=MR,
        PD=lambda creator: record(),
        QP=QP,
        QPCap=QPCap,
        QPInitAttr=QPInitAttr,
        QPAttr=QPAttr,
        SGE=SGE,
        SendWR=SendWR,
        Error=type("PyverbsError", (Exception,), {}),
        e=e,
        work=work,
    )


@pytest.fixture
def fake(monkeypatch, tmp_path):
    verbs = _fake_verbs()
    (tmp_path / "fake0").mkdir()
    monkeypatch.setattr(rdma, "SYSFS_DEVICES", tmp_path)
    monkeypatch.setattr(rdma, "_load", lambda: verbs)
    yield verbs
    assert all(item.freed for item in verbs.work)


def _connected(device: RdmaDevice, **kwargs) -> tuple[RcConnection, RcConnection]:
    a, b = RcConnection(device, **kwargs), RcConnection(device, **kwargs)
    a.connect(b.local_info())
    b.connect(a.local_info())
    return a, b


def test_glue_moves_bytes_and_sorts_completions_of_a_shared_cq_by_qp(fake):
    device = RdmaDevice()
    assert (device.name, device.max_message_size, device.cq_depth) == ("fake0", 1 << 16, 512)
    a, b = _connected(device)
    assert a._qp.sq_psn == b._qp.rq_psn == a.psn and b._qp.sq_psn == a._qp.rq_psn == b.psn
    source = bytearray(os.urandom(1 << 18))
    target = bytearray(1 << 18)
    src, dst = device.register(source, writable=False), device.register(target, writable=True)
    for i in range(4):
        a.post_write(i, src, i << 16, 1 << 16, dst.remote(), i << 16)
    back = bytearray(100)
    bck = device.register(back, writable=True)
    b.post_read(7, bck, 0, 100, src.remote(), 1000)
    assert (a.inflight, b.inflight) == (4, 1)
    assert b.poll() == [(7, True, "success")] and back == source[1000:1100]
    assert a.poll(max_entries=3) == [(i, True, "success") for i in range(3)]
    assert a.poll() == [(3, True, "success")] and a.poll() == []
    assert (a.inflight, b.inflight) == (0, 0) and target == source
    for closable in (bck, dst, src, a, b):
        closable.close()
        closable.close()
    target.extend(b"resizable again once deregistered")
    device.close()


def test_glue_reports_a_failed_completion_then_flushes(fake):
    device = RdmaDevice()
    a, b = _connected(device)
    local = device.register(bytearray(64), writable=True)
    read_only = device.register(bytearray(64), writable=False)
    a.post_write(1, local, 0, 8, read_only.remote(), 0)
    a.post_read(2, local, 0, 8, read_only.remote(), 0)
    assert a.poll() == [
        (1, False, "IBV_WC_REM_ACCESS_ERR (vendor error 0x0)"),
        (2, False, "IBV_WC_WR_FLUSH_ERR (vendor error 0x0)"),
    ]
    device.close()


def test_glue_refuses_misuse(fake):
    device = RdmaDevice()
    a = RcConnection(device, max_send_wr=2)
    local = device.register(bytearray(64), writable=True)
    remote = local.remote()
    with pytest.raises(RdmaError, match="not connected"):
        a.post_write(1, local, 0, 8, remote, 0)
    b = RcConnection(device, max_send_wr=2)
    a.connect(b.local_info())
    b.connect(a.local_info())
    with pytest.raises(RdmaError, match="already connected"):
        a.connect(b.local_info())
    with pytest.raises(ValueError, match="max message size"):
        a.post_write(1, local, 0, (1 << 16) + 1, RemoteRegion(remote.addr, remote.rkey, 1 << 20), 0)
    with pytest.raises(ValueError, match="wr_id"):
        a.post_write(-1, local, 0, 8, remote, 0)
    a.post_write(1, local, 0, 8, remote, 8)
    a.post_write(2, local, 0, 8, remote, 16)
    with pytest.raises(RdmaError, match="send queue full"):
        a.post_write(3, local, 0, 8, remote, 24)
    assert len(a.poll()) == 2
    with pytest.raises(RdmaError, match="completion queue of 512 entries has 508 left, 509 asked"):
        RcConnection(device, max_send_wr=509)
    with pytest.raises(ValueError, match="max_send_wr"):
        RcConnection(device, max_send_wr=0)
    other = RdmaDevice()
    foreign = other.register(bytearray(64), writable=True)
    with pytest.raises(ValueError, match="another device"):
        a.post_write(4, foreign, 0, 8, remote, 0)
    local.close()
    with pytest.raises(ValueError, match="closed"):
        a.post_write(5, local, 0, 8, remote, 0)
    b.close()
    with pytest.raises(RdmaError, match="is closed"):
        b.poll()
    assert RcConnection(device, max_send_wr=510).max_send_wr == 510
    device.close()
    with pytest.raises(RdmaError, match="fake0 is closed"):
        a.poll()
    with pytest.raises(RdmaError, match="fake0 is closed"):
        device.register(bytearray(8), writable=True)
    a.close()
    other.close()


def _open_device() -> RdmaDevice:
    return RdmaDevice(
        name=os.environ.get("TSUKIMI_RDMA_DEVICE") or None,
        gid_index=int(os.environ.get("TSUKIMI_RDMA_GID_INDEX", "0")),
    )


def _wait(connection: RcConnection, count: int, timeout: float = 10.0) -> list[tuple[int, bool, str]]:
    done: list[tuple[int, bool, str]] = []
    deadline = time.monotonic() + timeout
    while len(done) < count:
        assert time.monotonic() < deadline, f"{len(done)} of {count} completions after {timeout}s"
        done += connection.poll()
    return done


@pytest.fixture
def pair():
    """Two devices (a context and PD each, as two processes would have) with connected QPs."""
    with closing(_open_device()) as dev_a, closing(_open_device()) as dev_b:
        with closing(RcConnection(dev_a)) as qp_a, closing(RcConnection(dev_b)) as qp_b:
            info_a = msgspec.json.decode(msgspec.json.encode(qp_a.local_info()), type=QpInfo)
            info_b = msgspec.json.decode(msgspec.json.encode(qp_b.local_info()), type=QpInfo)
            qp_a.connect(info_b)
            qp_b.connect(info_a)
            yield dev_a, dev_b, qp_a, qp_b


@needs_rdma
def test_loopback_write_then_read_back(pair):
    dev_a, dev_b, qp_a, _ = pair
    size = 3 * (1 << 20) + 17
    source = bytearray(os.urandom(size))
    target = bytearray(size)
    back = bytearray(size)
    src = dev_a.register(source, writable=False)
    dst = dev_b.register(target, writable=True)
    bck = dev_a.register(back, writable=True)
    with closing(src), closing(dst), closing(bck):
        remote = dst.remote()
        slice_size = min(1 << 20, dev_a.max_message_size)
        offsets = range(0, size, slice_size)
        for wr_id, offset in enumerate(offsets):
            qp_a.post_write(wr_id, src, offset, min(slice_size, size - offset), remote, offset)
        done = _wait(qp_a, len(offsets))
        assert sorted(done) == [(wr_id, True, "success") for wr_id in range(len(offsets))]
        assert target == source

        qp_a.post_read(1000, bck, 5, size - 10, remote, 5)
        assert _wait(qp_a, 1) == [(1000, True, "success")]
        assert back[5:-5] == source[5:-5] and back[:5] == back[-5:] == bytes(5)


@needs_rdma
def test_loopback_refuses_out_of_bounds_and_reports_a_remote_access_error(pair):
    dev_a, dev_b, qp_a, _ = pair
    local = bytearray(4096)
    peer = bytearray(4096)
    mr = dev_a.register(local, writable=True)
    read_only = dev_b.register(peer, writable=False)
    with closing(mr), closing(read_only):
        remote = read_only.remote()
        with pytest.raises(ValueError):
            qp_a.post_write(1, mr, 0, 4097, remote, 0)
        with pytest.raises(ValueError):
            qp_a.post_read(1, mr, 1, 4096, remote, 0)
        with pytest.raises(ValueError):
            huge = RemoteRegion(remote.addr, remote.rkey, 1 << 62)
            qp_a.post_write(1, mr, 0, dev_a.max_message_size + 1, huge, 0)
        # The peer registered read-only: a WRITE into it must fail remotely, not corrupt it.
        qp_a.post_write(2, mr, 0, 16, remote, 0)
        [(wr_id, ok, text)] = _wait(qp_a, 1)
        assert (wr_id, ok) == (2, False) and "REM_ACCESS" in text
        assert peer == bytes(4096)
