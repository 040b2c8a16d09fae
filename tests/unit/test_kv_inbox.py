"""The decode worker's inbox of delivered KV: budget, completion, cancellation, orphans."""

import time

import msgspec
import pytest

from tsukimi.decode.kv_inbox import KVInbox
from tsukimi.model.kv import KVLayout
from tsukimi.transfer.tcp import TransferError

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, seq_len=4, head_dim=8, dtype="float32")  # 512 bytes
META = msgspec.msgpack.encode(LAYOUT)


def test_allocate_complete_take():
    inbox = KVInbox(max_bytes=1 << 20, orphan_ttl_s=30)
    buf = inbox.allocate("r1", META, 512)
    assert len(buf) == 512 and inbox.num_bytes == 512
    assert inbox.take("r1") is None  # not complete yet: never served half-written
    inbox.complete("r1")
    delivery = inbox.take("r1")
    assert delivery.layout == LAYOUT and delivery.buffer is buf
    assert inbox.num_bytes == 0 and len(inbox) == 0


def test_refuses_over_budget_mismatch_duplicate():
    inbox = KVInbox(max_bytes=1000, orphan_ttl_s=30)
    inbox.num_bytes_in_use_elsewhere = 400
    inbox.allocate("r0", META, 512)
    with pytest.raises(TransferError, match="memory full"):
        inbox.allocate("r1", META, 512)
    assert inbox.num_bytes == 512
    with pytest.raises(TransferError, match="layout says"):
        inbox.allocate("r2", META, 100)
    with pytest.raises(TransferError, match="already"):
        inbox.allocate("r0", META, 512)
    with pytest.raises(TransferError, match="bad KV layout"):
        inbox.allocate("r3", b"\x00junk", 512)


def test_cancel_frees_and_refuses_late_kv():
    inbox = KVInbox(max_bytes=1 << 20, orphan_ttl_s=30)
    inbox.allocate("r1", META, 512)
    assert inbox.cancel("r1") is True
    assert inbox.num_bytes == 0
    assert inbox.cancel("r2") is False
    with pytest.raises(TransferError, match="cancelled"):
        inbox.allocate("r2", META, 512)


def test_sweep_frees_orphans():
    inbox = KVInbox(max_bytes=1 << 20, orphan_ttl_s=0.05)
    inbox.allocate("r1", META, 512)
    inbox.complete("r1")
    assert inbox.sweep() == []
    time.sleep(0.08)
    assert inbox.sweep() == ["r1"]
    assert inbox.num_bytes == 0
