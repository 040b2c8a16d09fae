"""The decode worker's KV block reservations: hand-over, refusals, cancellation, orphans."""

import time

import pytest

from tsukimi.decode.block_manager import BlockManager
from tsukimi.decode.kv_inbox import KVInbox, KVRefused


def test_reserve_and_take():
    manager = BlockManager(8)
    inbox = KVInbox(manager, orphan_ttl_s=30)
    a = inbox.reserve("r1", 3)
    b = inbox.reserve("r2", 1)
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [3])
    assert manager.num_free_blocks == 4 and inbox.num_blocks == 4 and len(inbox) == 2
    assert inbox.take("r1") is a and inbox.take("r1") is None and len(inbox) == 1
    # Taken blocks belong to the taker: still allocated.
    assert manager.num_free_blocks == 4 and inbox.num_blocks == 1


def test_refuses_full_oversized_duplicate_and_cancelled():
    manager = BlockManager(4)
    inbox = KVInbox(manager, orphan_ttl_s=30)
    inbox.reserve("r0", 3)
    with pytest.raises(KVRefused, match="all in use") as full:
        inbox.reserve("r1", 2)
    assert full.value.is_full
    with pytest.raises(KVRefused, match="has 4") as oversized:
        inbox.reserve("r1", 5)
    assert not oversized.value.is_full
    with pytest.raises(KVRefused, match="already"):
        inbox.reserve("r0", 1)
    assert inbox.cancel("r0") is True
    assert manager.num_free_blocks == 1  # writes may still land: kept until released
    assert inbox.release("r0") is True and inbox.release("r0") is False
    assert manager.num_free_blocks == 4
    with pytest.raises(KVRefused, match="cancelled"):
        inbox.reserve("r0", 1)
    assert inbox.cancel("never-seen") is False
    with pytest.raises(KVRefused, match="cancelled"):
        inbox.reserve("never-seen", 1)


def test_sweep_frees_orphans():
    manager = BlockManager(4)
    inbox = KVInbox(manager, orphan_ttl_s=0.05)
    inbox.reserve("r1", 2)
    assert inbox.sweep() == []
    time.sleep(0.08)
    assert inbox.sweep() == ["r1"]
    assert manager.num_free_blocks == 4 and len(inbox) == 0


def test_a_cancelled_reservation_is_never_handed_over_and_freed_by_its_task_or_ttl():
    manager = BlockManager(4)
    inbox = KVInbox(manager, orphan_ttl_s=0.05)
    inbox.reserve("r1", 2)
    inbox.reserve("r2", 2)
    inbox.cancel("r1")
    inbox.cancel("r2")
    assert manager.num_free_blocks == 0
    assert inbox.take("r1") is None and manager.num_free_blocks == 2
    time.sleep(0.08)
    assert inbox.sweep() == ["r2"] and manager.num_free_blocks == 4
