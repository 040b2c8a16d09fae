from tsukimi.common.messages import BlockRemoved, BlockStored, PoolEvents, PoolSnapshot
from tsukimi.kvpool.pool_view import PoolView


def stored(key: bytes, instance_id: str = "a", tier: str = "dram") -> BlockStored:
    return BlockStored(key=key, instance_id=instance_id, tier=tier)


def removed(key: bytes, instance_id: str = "a", tier: str = "dram") -> BlockRemoved:
    return BlockRemoved(key=key, instance_id=instance_id, tier=tier)


def events(seq: int, *items, epoch: str = "e1") -> PoolEvents:
    return PoolEvents(epoch=epoch, seq=seq, events=list(items))


def snapshot(seq: int, *replicas, epoch: str = "e1") -> PoolSnapshot:
    return PoolSnapshot(epoch=epoch, seq=seq, replicas=list(replicas))


def loaded(seq: int = 0, *replicas, epoch: str = "e1", max_buffered: int = 10_000) -> PoolView:
    view = PoolView(max_buffered=max_buffered)
    view.load(snapshot(seq, *replicas, epoch=epoch))
    return view


def test_new_view_needs_resync_and_buffers_until_loaded():
    view = PoolView()
    assert view.needs_resync and view.epoch is None and view.seq == 0
    assert view.apply(events(1, stored(b"k1"))) is False
    assert view.num_blocks == 0 and view.num_buffered == 1
    view.load(snapshot(0))
    assert not view.needs_resync and view.epoch == "e1" and view.seq == 1
    assert view.holders(b"k1") == {("a", "dram")}
    assert view.num_buffered == 0


def test_apply_in_order():
    view = loaded()
    assert view.apply(events(1, stored(b"k1"), stored(b"k1", "b"), stored(b"k2")))
    assert view.apply(events(2, removed(b"k1"), stored(b"k1", "a", "ssd")))
    assert view.seq == 2 and not view.needs_resync
    assert view.holders(b"k1") == {("b", "dram"), ("a", "ssd")}
    assert view.holders(b"k2") == {("a", "dram")}
    assert view.num_blocks == 2
    assert view.apply(events(3, removed(b"k2")))
    assert view.holders(b"k2") == set() and view.num_blocks == 1


def test_duplicate_and_old_messages_are_ignored():
    view = loaded()
    assert view.apply(events(1, stored(b"k1")))
    assert view.apply(events(2, removed(b"k1")))
    assert view.apply(events(2, removed(b"k1"))) is True
    assert view.apply(events(1, stored(b"k1"))) is True
    assert view.seq == 2 and not view.needs_resync
    assert view.num_blocks == 0 and view.num_buffered == 0


def test_events_within_a_message_apply_in_order():
    view = loaded()
    assert view.apply(events(1, stored(b"k1"), removed(b"k1"), stored(b"k2"), removed(b"k2"), stored(b"k2")))
    assert view.holders(b"k1") == set() and view.holders(b"k2") == {("a", "dram")}


def test_redundant_events_are_harmless():
    view = loaded()
    assert view.apply(events(1, stored(b"k1"), stored(b"k1"), removed(b"k9"), removed(b"k1", "b")))
    assert view.holders(b"k1") == {("a", "dram")} and view.num_blocks == 1


def test_gap_then_snapshot_replays_newer_buffered_messages():
    view = loaded()
    assert view.apply(events(1, stored(b"k1")))
    assert view.apply(events(3, stored(b"k3"))) is False
    assert view.needs_resync and view.seq == 1
    assert view.holders(b"k3") == set()
    assert view.apply(events(4, stored(b"k4"))) is False
    assert view.apply(events(5, removed(b"k1"))) is False
    assert view.num_buffered == 3
    view.load(snapshot(3, stored(b"k1"), stored(b"k2"), stored(b"k3")))
    assert not view.needs_resync and view.epoch == "e1" and view.seq == 5
    assert view.holders(b"k1") == set()
    assert {k for k in (b"k1", b"k2", b"k3", b"k4") if view.holders(k)} == {b"k2", b"k3", b"k4"}
    assert view.num_blocks == 3 and view.num_buffered == 0
    assert view.apply(events(6, stored(b"k6")))
    assert view.seq == 6 and view.num_blocks == 4


def test_load_replaces_the_whole_index():
    view = loaded()
    assert view.apply(events(1, stored(b"old"), stored(b"k1", "b")))
    view.load(snapshot(7, stored(b"k1", "a", "ssd")))
    assert view.seq == 7 and not view.needs_resync
    assert view.holders(b"old") == set()
    assert view.holders(b"k1") == {("a", "ssd")} and view.num_blocks == 1


def test_snapshot_older_than_buffered_messages_leaves_a_gap():
    view = loaded()
    assert view.apply(events(1, stored(b"k1")))
    assert view.apply(events(5, stored(b"k5"))) is False
    assert view.apply(events(6, stored(b"k6"))) is False
    view.load(snapshot(3, stored(b"k1"), stored(b"k2"), stored(b"k3")))
    assert view.needs_resync and view.seq == 3
    assert view.holders(b"k3") == {("a", "dram")} and view.holders(b"k5") == set()
    assert view.num_buffered == 2
    assert view.apply(events(7, stored(b"k7"))) is False
    view.load(snapshot(4, stored(b"k1"), stored(b"k2"), stored(b"k3"), stored(b"k4")))
    assert not view.needs_resync and view.seq == 7
    assert view.num_blocks == 7 and view.num_buffered == 0


def test_snapshot_newer_than_buffered_messages_skips_them():
    view = loaded()
    assert view.apply(events(2, stored(b"k2"))) is False
    assert view.apply(events(3, removed(b"k2"))) is False
    view.load(snapshot(3, stored(b"k9")))
    assert not view.needs_resync and view.seq == 3
    assert view.holders(b"k2") == set() and view.holders(b"k9") == {("a", "dram")}
    assert view.num_buffered == 0


def test_buffered_duplicates_and_out_of_order_messages_replay_once_in_seq_order():
    view = loaded()
    assert view.apply(events(3, removed(b"k1"))) is False
    assert view.apply(events(2, stored(b"k1"))) is False
    assert view.apply(events(3, removed(b"k1"))) is False
    view.load(snapshot(1))
    assert not view.needs_resync and view.seq == 3
    assert view.holders(b"k1") == set()


def test_new_epoch_needs_resync():
    view = loaded()
    assert view.apply(events(1, stored(b"k1")))
    assert view.apply(events(2, stored(b"k2")))
    assert view.apply(events(1, stored(b"x1"), epoch="e2")) is False
    assert view.needs_resync and view.epoch == "e1" and view.seq == 2
    assert view.holders(b"x1") == set()
    assert view.apply(events(3, stored(b"k3"))) is False
    assert view.apply(events(2, stored(b"x2"), epoch="e2")) is False
    view.load(snapshot(1, stored(b"x1"), epoch="e2"))
    assert not view.needs_resync and view.epoch == "e2" and view.seq == 2
    assert view.holders(b"k1") == set() and view.holders(b"k3") == set()
    assert view.holders(b"x2") == {("a", "dram")} and view.num_blocks == 2
    assert view.num_buffered == 0
    assert view.apply(events(3, epoch="e2")) and view.seq == 3


def test_buffer_overflow_drops_the_buffer_and_stays_needing_resync():
    view = loaded(max_buffered=3)
    assert view.apply(events(1, stored(b"k1")))
    for seq in (3, 4, 5):
        assert view.apply(events(seq, stored(b"k%d" % seq))) is False
    assert view.num_buffered == 3
    assert view.apply(events(6, stored(b"k6"))) is False
    assert view.needs_resync and view.num_buffered == 1
    view.load(snapshot(2, stored(b"k1"), stored(b"k2")))
    assert view.needs_resync and view.seq == 2
    assert view.holders(b"k5") == set() and view.num_buffered == 1
    view.load(snapshot(5, *(stored(b"k%d" % i) for i in range(1, 6))))
    assert not view.needs_resync and view.seq == 6 and view.num_blocks == 6


def test_num_leading_counts_leading_keys_per_instance_and_tier():
    view = loaded()
    keys = [b"k1", b"k2", b"k3", b"k4"]
    assert view.apply(events(
        1,
        *(stored(k, "a") for k in keys),
        *(stored(k, "b") for k in keys[:2]),
        *(stored(k, "a", "ssd") for k in keys),
        stored(b"k2", "c"), stored(b"k3", "c"),
    ))
    assert view.num_leading(keys) == {"a": {"dram": 4, "ssd": 4}, "b": {"dram": 2}}
    assert view.apply(events(2, removed(b"k2", "a")))
    assert view.num_leading(keys) == {"a": {"dram": 1, "ssd": 4}, "b": {"dram": 2}}
    assert view.num_leading(keys[1:]) == {"a": {"ssd": 3}, "b": {"dram": 1}, "c": {"dram": 2}}
    assert view.num_leading([b"k0", *keys]) == {}
    assert view.num_leading([]) == {}
    assert view.apply(events(3, stored(b"k2", "a")))
    assert view.num_leading(keys) == {"a": {"dram": 4, "ssd": 4}, "b": {"dram": 2}}


def test_forget_instance_drops_its_replicas():
    view = loaded(4, stored(b"k1", "a"), stored(b"k1", "a", "ssd"), stored(b"k1", "b"), stored(b"k2", "a"))
    view.forget_instance("a")
    assert view.holders(b"k1") == {("b", "dram")} and view.holders(b"k2") == set()
    assert view.num_blocks == 1 and view.seq == 4 and not view.needs_resync
    assert view.num_leading([b"k1", b"k2"]) == {"b": {"dram": 1}}
    view.forget_instance("a")
    view.forget_instance("nobody")
    assert view.apply(events(5, removed(b"k2", "a"), stored(b"k2", "a")))
    assert view.holders(b"k2") == {("a", "dram")}
    view.forget_instance("a")
    assert view.holders(b"k2") == set() and view.num_blocks == 1


def test_removing_one_tier_keeps_the_instance_forgettable():
    view = loaded(1, stored(b"k1", "a"), stored(b"k1", "a", "ssd"))
    assert view.apply(events(2, removed(b"k1", "a")))
    assert view.holders(b"k1") == {("a", "ssd")}
    view.forget_instance("a")
    assert view.num_blocks == 0
