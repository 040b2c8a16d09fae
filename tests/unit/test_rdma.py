"""RDMA transport: availability reporting, bounds checks, flat views and exchanged descriptors run everywhere;
a real two-QP loopback runs where a device exists (the glue over stand-ins for pyverbs is in test_rdma_glue.py).

The loopback tests run on any machine with pyverbs and an active RDMA port, e.g. SoftRoCE:
`rdma link add rxe0 type rxe netdev eth0`. TSUKIMI_RDMA_DEVICE and TSUKIMI_RDMA_GID_INDEX pick the device
and GID index (default: the first device, index 0).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time
import types
from contextlib import closing

import msgspec
import pytest

from tsukimi.transfer import rdma
from tsukimi.transfer.rdma import RdmaDevice, RdmaUnavailable, RemoteRegion, probe
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
