"""The decode worker's KV block reservations: hand-over, refusals, cancellation, orphans."""

import time

import pytest

from tsukimi.decode.block_manager import BlockManager
from tsukimi.decode.kv_inbox import KVInbox, KVRefused
from tsukimi.transfer.write_guard import WriteGuard


class Clock:
    """Monotonic seconds the test sets."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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


def test_sweep_ends_orphans_and_frees_their_blocks_a_ttl_later():
    manager = BlockManager(4)
    inbox = KVInbox(manager, orphan_ttl_s=0.05)
    inbox.reserve("r1", 2)
    assert inbox.sweep() == []
    time.sleep(0.08)
    assert inbox.sweep() == ["r1"] and len(inbox) == 0
    # Cooling: its writer may be mid-copy.
    assert manager.num_free_blocks == 2 and inbox.num_blocks == 2
    time.sleep(0.08)
    assert inbox.sweep() == [] and manager.num_free_blocks == 4 and inbox.num_blocks == 0


def test_a_cancelled_reservation_is_never_handed_over_and_freed_by_its_task_or_ttl():
    manager, clock = BlockManager(4), Clock()
    inbox = KVInbox(manager, orphan_ttl_s=10, clock=clock)
    inbox.reserve("r1", 2)
    inbox.reserve("r2", 2)
    inbox.cancel("r1")
    inbox.cancel("r2")
    assert manager.num_free_blocks == 0
    assert inbox.take("r1") is None and manager.num_free_blocks == 2
    clock.now = 10.5
    assert inbox.sweep() == ["r2"] and manager.num_free_blocks == 2
    clock.now = 21.0
    assert inbox.sweep() == [] and manager.num_free_blocks == 4


def test_renewals_keep_a_reservation_alive_and_its_ttl_counts_from_the_last_one():
    manager, clock = BlockManager(4), Clock()
    inbox = KVInbox(manager, orphan_ttl_s=10, clock=clock)
    inbox.reserve("renewed", 2)
    inbox.reserve("silent", 1)
    clock.now = 9.0
    assert inbox.renew(["renewed", "never-seen"]) == 1
    clock.now = 10.0
    assert inbox.sweep() == []  # silent for exactly the TTL: not yet
    clock.now = 10.5
    assert inbox.sweep() == ["silent"] and manager.num_free_blocks == 1  # cooling: freed a TTL later
    clock.now = 18.0  # 9 s after its renewal, 18 s after it was made
    assert inbox.sweep() == [] and len(inbox) == 1 and manager.num_free_blocks == 1
    assert inbox.renew(["renewed", "silent"]) == 1
    clock.now = 28.0
    assert inbox.sweep() == [] and manager.num_free_blocks == 2
    clock.now = 28.5
    assert inbox.sweep() == ["renewed"] and len(inbox) == 0 and manager.num_free_blocks == 2
    assert inbox.renew(["renewed"]) == 0
    clock.now = 38.6
    assert inbox.sweep() == [] and manager.num_free_blocks == 4 and inbox.num_blocks == 0


def test_a_cancelled_reservation_is_renewed_until_released():
    manager, clock = BlockManager(4), Clock()
    inbox = KVInbox(manager, orphan_ttl_s=10, clock=clock)
    inbox.reserve("r1", 2)
    inbox.cancel("r1")
    clock.now = 8.0
    assert inbox.renew(["r1"]) == 1
    clock.now = 15.0
    assert inbox.sweep() == [] and manager.num_free_blocks == 2
    assert inbox.release("r1") is True and manager.num_free_blocks == 4


def test_each_reservation_owns_its_blocks_in_the_write_guard_until_taken_released_or_swept():
    manager, clock = BlockManager(6), Clock()
    guard = WriteGuard(6 * 64, 64)
    try:
        inbox = KVInbox(manager, orphan_ttl_s=10, guard=guard, clock=clock)
        a, b, c = inbox.reserve("a", 2), inbox.reserve("b", 2), inbox.reserve("c", 1)
        assert len({a.nonce, b.nonce, c.nonce}) == 3 and 0 not in {a.nonce, b.nonce, c.nonce}
        assert [guard.owner(u) for u in range(6)] == [a.nonce, a.nonce, b.nonce, b.nonce, c.nonce, 0]
        assert guard.refusal(0, 128, a.nonce) == ""
        assert guard.refusal(128, 64, a.nonce).startswith("unit 2 ")  # b's block
        assert inbox.take("a") is a and manager.num_free_blocks == 1  # the sequence has the blocks now
        assert inbox.release("b") is True
        inbox.cancel("c")
        assert guard.owner(4) == c.nonce  # cancelled: its writes may still land until it is released
        assert [guard.owner(u) for u in range(6)] == [0, 0, 0, 0, c.nonce, 0]
        # b's blocks go to d; b's writer, stale, is refused there.
        d = inbox.reserve("d", 3)
        assert d.block_ids == [5, 2, 3] and d.nonce not in {a.nonce, b.nonce, c.nonce}
        assert [guard.owner(u) for u in (5, 2, 3)] == [d.nonce] * 3
        assert guard.refusal(2 * 64, 64, b.nonce).startswith("unit 2 of 64 bytes is owned by another writer")
        clock.now = 10.5
        assert inbox.sweep() == ["c", "d"] and manager.num_free_blocks == 0
        assert [guard.owner(u) for u in range(6)] == [0] * 6  # refused at once, freed a TTL later
        clock.now = 21.0
        assert inbox.sweep() == [] and manager.num_free_blocks == 4
    finally:
        guard.close()
