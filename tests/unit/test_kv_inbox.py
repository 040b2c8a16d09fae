"""The decode worker's KV reservations: budget, hand-over, cancellation, orphans."""

import time

import pytest

from tsukimi.decode.kv_inbox import KVInbox, KVRefused


def test_reserve_take_release():
    inbox = KVInbox(capacity=4096, orphan_ttl_s=30)
    a = inbox.reserve("r1", 1000)
    b = inbox.reserve("r2", 100)
    assert (a.offset, b.offset) == (0, 1024)
    assert inbox.num_free_bytes == 4096 - 1024 - 128 and len(inbox) == 2
    taken = inbox.take("r1")
    assert taken is a and inbox.take("r1") is None and len(inbox) == 1
    inbox.release(taken)
    assert inbox.num_free_bytes == 4096 - 128


def test_refuses_full_duplicate_and_cancelled():
    inbox = KVInbox(capacity=1024, orphan_ttl_s=30)
    inbox.reserve("r0", 900)
    with pytest.raises(KVRefused, match="arena full"):
        inbox.reserve("r1", 512)
    with pytest.raises(KVRefused, match="already"):
        inbox.reserve("r0", 8)
    assert inbox.cancel("r0") is True
    assert inbox.num_free_bytes == 1024
    with pytest.raises(KVRefused, match="cancelled"):
        inbox.reserve("r0", 8)
    assert inbox.cancel("never-seen") is False
    with pytest.raises(KVRefused, match="cancelled"):
        inbox.reserve("never-seen", 8)


def test_sweep_frees_orphans():
    inbox = KVInbox(capacity=1024, orphan_ttl_s=0.05)
    inbox.reserve("r1", 512)
    assert inbox.sweep() == []
    time.sleep(0.08)
    assert inbox.sweep() == ["r1"]
    assert inbox.num_free_bytes == 1024 and len(inbox) == 0
