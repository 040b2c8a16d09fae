"""RDMA transport glue over in-process stand-ins for pyverbs (`fake_verbs.py`), run everywhere: bytes moved and
completions of a shared CQ sorted by QP, a failed completion then the flush, and misuse refused."""

from __future__ import annotations

import os

import pytest

from tsukimi.transfer import rdma
from tsukimi.transfer.rdma import RdmaDevice, RdmaError, RemoteRegion
from tsukimi.transfer.rdma_connection import RcConnection

from .fake_verbs import _fake_verbs


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
