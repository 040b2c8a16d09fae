"""The pool master: two-phase puts, leases, LRU eviction with SSD demotion, instance loss. Exact expectations."""

import pytest

from tsukimi.cachestore.master import PoolMaster
from tsukimi.cachestore.records import PoolError, Replica

K = [bytes([i]) * 32 for i in range(16)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def put(master, key, size=100):
    replicas, evictions = master.put_start(key, size, "crc")
    return replicas, evictions + master.put_end(key)


def test_two_phase_put_visibility_and_revoke():
    m = PoolMaster()
    m.add_instance("a", dram_bytes=1024)
    replicas, evictions = m.put_start(K[0], 100, "crc")
    assert replicas == [Replica("a", "dram", 0, 100)] and evictions == []
    assert not m.exists(K[0]) and m.get(K[0]) is None  # half-written: never served
    assert m.lookup_prefix([K[0]]) == {"a": {"dram": 0}}
    assert m.put_start(K[0], 100, "crc") == ([], [])  # already being written
    m.put_end(K[0])
    assert m.exists(K[0]) and m.lookup_prefix([K[0], K[1]]) == {"a": {"dram": 1}}
    m.put_start(K[1], 100, "crc")
    m.put_revoke(K[1])
    assert m.put_start(K[2], 100, "crc")[0] == [Replica("a", "dram", 128, 100)]  # K1's space came back


def test_replicas_go_to_distinct_instances_most_free_first():
    m = PoolMaster()
    m.add_instance("a", dram_bytes=1024)
    m.add_instance("b", dram_bytes=4096)
    replicas, _ = m.put_start(K[0], 100, "crc", num_replicas=2)
    assert [r.instance_id for r in replicas] == ["b", "a"]
    m.put_end(K[0])
    assert m.lookup_prefix([K[0]]) == {"a": {"dram": 1}, "b": {"dram": 1}}
    with pytest.raises(PoolError):
        PoolMaster().put_start(K[0], 1, "crc")


def test_lru_eviction_spares_leased_blocks_and_leases_expire():
    clock = Clock()
    m = PoolMaster(lease_s=10, high_watermark=0.9, evict_share=0.3, clock=clock)
    m.add_instance("a", dram_bytes=640)  # room for 5 blocks of 128
    for i in range(4):
        put(m, K[i], 128)
    _, lease = m.get(K[0])  # K0 leased (and most recent)
    assert m.remove(K[0]) is False
    # A fifth block: 640 > 0.9 * 640, evict until <= 640 - 192 = 448, oldest unleased first: K1, K2.
    _, evictions = put(m, K[4], 128)
    assert [e.key for e in evictions] == [K[1], K[2]] and all(e.demoted_to is None for e in evictions)
    assert m.exists(K[0]) and not m.exists(K[1])
    clock.now = 11  # the lease expired
    assert m.remove(K[0]) is True
    m.release(K[3], 999)  # unknown lease: harmless


def test_eviction_demotes_to_ssd_and_get_prefers_dram():
    m = PoolMaster(high_watermark=0.9, evict_share=0.4)
    m.add_instance("a", dram_bytes=256, ssd_bytes=4096)
    put(m, K[0], 128)
    _, evictions = put(m, K[1], 128)  # 256 of 256 > 90%: K0 moves to SSD
    assert [(e.key, e.replica.tier, e.demoted_to.tier) for e in evictions] == [(K[0], "dram", "ssd")]
    assert m.lookup_prefix([K[0], K[1]]) == {"a": {"dram": 0, "ssd": 1}}
    replicas, lease = m.get(K[0])
    assert [r.tier for r in replicas] == ["ssd"]
    m.release(K[0], lease)


def test_instance_loss_drops_its_replicas():
    m = PoolMaster()
    m.add_instance("a", dram_bytes=1024)
    m.add_instance("b", dram_bytes=1024)
    m.put_start(K[0], 100, "crc", num_replicas=2)
    m.put_end(K[0])
    m.put_start(K[1], 100, "crc", exclude=("b",))
    m.put_end(K[1])
    assert m.remove_instance("a") == [K[1]]
    assert m.exists(K[0]) and not m.exists(K[1])
    assert m.lookup_prefix([K[0]]) == {"b": {"dram": 1}}
    replicas, _ = m.get(K[0])
    m.drop_replica(K[0], replicas[0])  # its checksum failed: the last replica goes, the block with it
    assert not m.exists(K[0])


def test_full_tier_evicts_to_make_room_for_a_put():
    m = PoolMaster(high_watermark=1.0, evict_share=0.01)
    m.add_instance("a", dram_bytes=256)
    put(m, K[0], 128)
    put(m, K[1], 128)
    replicas, evictions = m.put_start(K[2], 128, "crc")
    assert replicas == [Replica("a", "dram", 0, 128)] and [e.key for e in evictions] == [K[0]]


def changes(m):
    return [(c.key, c.replica.instance_id, c.replica.tier, c.is_stored, c.source and c.source.tier)
            for c in m.take_changes()]


def test_changes_record_every_replica_of_visible_blocks_in_order():
    m = PoolMaster(high_watermark=0.9, evict_share=0.4)
    m.add_instance("a", dram_bytes=256, ssd_bytes=256)
    m.put_start(K[0], 128, "crc")
    assert changes(m) == []  # half-written blocks are nobody's business
    m.put_end(K[0])
    assert changes(m) == [(K[0], "a", "dram", True, None)]
    put(m, K[1], 128)  # K0 demoted: out of DRAM, onto SSD with DRAM as the source of its bytes
    assert changes(m) == [(K[1], "a", "dram", True, None), (K[0], "a", "dram", False, None),
                          (K[0], "a", "ssd", True, "dram")]
    assert sorted(m.snapshot()) == [(K[0], "a", "ssd"), (K[1], "a", "dram")]
    assert m.remove(K[0]) is True
    assert changes(m) == [(K[0], "a", "ssd", False, None)]
    m.put_start(K[2], 128, "crc")
    m.put_revoke(K[2])
    assert changes(m) == []


def test_promote_brings_an_ssd_block_back_to_dram_and_keeps_the_ssd_copy():
    m = PoolMaster(high_watermark=0.9, evict_share=0.4)
    m.add_instance("a", dram_bytes=256, ssd_bytes=1024)
    put(m, K[0], 128)
    put(m, K[1], 128)  # K0 -> SSD
    m.take_changes()
    assert m.promote(K[1]) is None  # already in DRAM
    replica = m.promote(K[0])
    assert replica == Replica("a", "dram", 0, 128)
    # K0 lands in the free half; DRAM then passes its watermark and K1 moves to SSD.
    assert changes(m) == [(K[0], "a", "dram", True, "ssd"), (K[1], "a", "dram", False, None),
                          (K[1], "a", "ssd", True, "dram")]
    assert [r.tier for r in m.get(K[0])[0]] == ["dram", "ssd"]
    assert m.lookup_prefix([K[0], K[1]]) == {"a": {"dram": 1, "ssd": 2}}
    put(m, K[2], 128)  # K0 leaves DRAM again: its SSD copy is already there, nothing to write
    assert (K[0], "a", "ssd", True, "dram") not in changes(m)


def test_change_replicas_raises_onto_other_instances_and_lowers_unleased():
    m = PoolMaster()
    m.add_instance("a", dram_bytes=1024)
    m.add_instance("b", dram_bytes=4096)
    m.add_instance("c", dram_bytes=2048)
    m.put_start(K[0], 100, "crc", exclude=("b", "c"))
    m.put_end(K[0])
    m.take_changes()
    after = m.change_replicas(K[0], 3)
    assert [r.instance_id for r in after] == ["a", "b", "c"]
    assert changes(m) == [(K[0], "b", "dram", True, "dram"), (K[0], "c", "dram", True, "dram")]
    _, lease = m.get(K[0])
    with pytest.raises(PoolError):
        m.change_replicas(K[0], 1)  # a reader may be using any of them
    m.release(K[0], lease)
    assert [r.instance_id for r in m.change_replicas(K[0], 0)] == ["a"]  # never below one
    assert changes(m) == [(K[0], "b", "dram", False, None), (K[0], "c", "dram", False, None)]
    with pytest.raises(PoolError):
        m.change_replicas(K[9], 2)


def test_instance_with_ssd_blocks_rejoins_and_conflicts_are_rejected():
    m = PoolMaster()
    m.add_instance("a", dram_bytes=1024)
    put(m, K[0], 100)
    rejected = m.add_instance("b", dram_bytes=1024, ssd_bytes=256,
                              ssd_blocks=[(K[0], 100, "crc"), (K[1], 100, "x"), (K[2], 100, "y"), (K[3], 50, "z")])
    # K0 gains an SSD replica on b; K1 fits; K2 does not fit (256 bytes hold two aligned 100-byte blocks);
    # K3 does not fit either.
    assert rejected == [K[2], K[3]]
    assert m.lookup_prefix([K[0], K[1]]) == {"a": {"dram": 1}, "b": {"dram": 0, "ssd": 2}}
    assert m.checksum(K[1]) == "x"
    m.take_changes()
    assert m.remove_instance("b") == [K[1]]
    assert changes(m) == [(K[0], "b", "ssd", False, None), (K[1], "b", "ssd", False, None)]


def test_promote_with_a_tiny_ssd_never_evicts_its_source_and_a_cascade_may_drop_the_demoted_block():
    m = PoolMaster(high_watermark=0.9, evict_share=0.4)
    m.add_instance("a", dram_bytes=256, ssd_bytes=256)
    put(m, K[0], 128)
    put(m, K[1], 128)  # K0 -> SSD
    m.take_changes()
    assert m.promote(K[0]) == Replica("a", "dram", 0, 128)
    # K1, pushed out of DRAM, lands on an SSD past its watermark whose only other block (K0) is the promotion's
    # source: K1 is the one dropped.
    assert changes(m) == [(K[0], "a", "dram", True, "ssd"), (K[1], "a", "dram", False, None),
                          (K[1], "a", "ssd", True, "dram"), (K[1], "a", "ssd", False, None)]
    assert m.exists(K[0]) and not m.exists(K[1])


def test_size_and_replicas_dram_first_after_a_promotion():
    m = PoolMaster(high_watermark=0.9, evict_share=0.4)
    m.add_instance("a", dram_bytes=256, ssd_bytes=4096)
    put(m, K[0], 128)
    put(m, K[1], 128)  # K0 demoted to SSD
    assert m.size(K[0]) == 128 and m.size(K[9]) == 0
    assert [r.tier for r in m.replicas(K[0])] == ["ssd"]
    m.remove(K[1])
    assert m.promote(K[0]).tier == "dram"
    # The DRAM replica was added after the SSD one; readers still get it first.
    assert [r.tier for r in m.replicas(K[0])] == ["dram", "ssd"]
    replicas, lease = m.get(K[0])
    assert [r.tier for r in replicas] == ["dram", "ssd"]
    m.release(K[0], lease)


def test_a_put_never_ended_is_revoked_after_its_timeout_and_its_space_and_key_come_back():
    clock = Clock()
    m = PoolMaster(clock=clock, put_timeout_s=30.0)
    m.add_instance("a", dram_bytes=256)
    assert m.put_start(K[0], 128, "crc")[0] == [Replica("a", "dram", 0, 128)]  # its writer dies here
    put(m, K[1], 100)
    clock.now = 29.0
    assert m.put_start(K[0], 128, "crc") == ([], [])  # still being written
    assert m.num_expired_puts == 0
    clock.now = 30.5
    # The next operation revokes it: the key can be put again, into the space it held.
    assert m.put_start(K[0], 128, "crc")[0] == [Replica("a", "dram", 0, 128)]
    assert m.num_expired_puts == 1
    m.put_end(K[0])
    assert m.exists(K[0]) and m.exists(K[1])
    # Ended puts are never revoked, however long after.
    clock.now = 1000.0
    assert m.exists(K[0]) and m.exists(K[1]) and m.num_expired_puts == 1


def test_a_late_put_end_after_the_revocation_is_refused():
    clock = Clock()
    m = PoolMaster(clock=clock, put_timeout_s=5.0)
    m.add_instance("a", dram_bytes=256)
    m.put_start(K[0], 64, "crc")
    clock.now = 6.0
    with pytest.raises(PoolError, match="unknown block"):
        m.put_end(K[0])
    assert m.tier_usage() == [("a", "dram", 256, 0, 0)]


# ---- reserved slots ------------------------------------------------------------------------------------------


def test_reserved_slots_become_blocks_at_their_ends_and_go_back_when_returned():
    m = PoolMaster()
    m.add_instance("a", dram_bytes=512)
    slots = m.reserve(128, 3)
    assert [r for _, r in slots] == [Replica("a", "dram", 0, 128), Replica("a", "dram", 128, 128),
                                     Replica("a", "dram", 256, 128)]
    assert len({i for i, _ in slots}) == 3 and m.num_slots == 3 and m.num_blocks == 0
    (s0, _), (s1, _), (s2, _) = slots
    # Only one more block fits beside them, and a reserve gets what there is.
    (s3, r3), = m.reserve(128, 2)
    assert r3 == Replica("a", "dram", 384, 128)
    # Ended with its key: the block is visible at once, where the slot was.
    assert m.end_slot(s1, K[0], "crc") == 128
    assert m.exists(K[0]) and m.replicas(K[0]) == [Replica("a", "dram", 128, 128)] and m.checksum(K[0]) == "crc"
    assert m.take_changes()[0].replica == Replica("a", "dram", 128, 128)
    # A key the pool holds already keeps its block; that slot goes back (its room is free again).
    assert m.end_slot(s0, K[0], "crc") == 0 and m.replicas(K[0]) == [Replica("a", "dram", 128, 128)]
    assert m.put_start(K[1], 100, "crc")[0] == [Replica("a", "dram", 0, 100)]
    # An id ended, returned, or unknown (another pool's) changes nothing.
    assert m.end_slot(s1, K[2], "crc") == 0 and m.end_slot(12345, K[2], "crc") == 0 and not m.exists(K[2])
    m.return_slot(s2)
    m.return_slot(s2)
    assert m.num_slots == 1 and m.put_start(K[3], 128, "crc")[0] == [Replica("a", "dram", 256, 128)]
    # An empty key is no block: the slot goes back.
    assert m.end_slot(s3, b"", "crc") == 0 and not m.exists(b"") and m.num_slots == 0
    assert m.put_start(K[4], 128, "crc")[0] == [Replica("a", "dram", 384, 128)]


def test_a_reserve_evicts_lru_blocks_but_slots_are_never_evicted():
    m = PoolMaster()
    m.add_instance("a", dram_bytes=256)
    put(m, K[0], 128)
    put(m, K[1], 128)
    (s0, r0), = m.reserve(128, 1)
    # K0, the oldest, made room for the slot.
    assert r0 == Replica("a", "dram", 0, 128) and not m.exists(K[0]) and m.num_evictions == 1
    # A put now evicts K1, not the slot.
    assert m.put_start(K[2], 128, "crc")[0] == [Replica("a", "dram", 128, 128)] and not m.exists(K[1])
    with pytest.raises(PoolError):
        m.put_start(K[3], 128, "crc")  # the slot and the block being written hold all of it
    assert m.end_slot(s0, K[0], "crc") == 128 and m.exists(K[0])


def test_a_slot_not_ended_within_the_put_timeout_goes_back():
    clock = Clock()
    m = PoolMaster(clock=clock, put_timeout_s=30.0)
    m.add_instance("a", dram_bytes=256)
    (s0, _), (s1, _) = m.reserve(128, 2)
    clock.now = 29.0
    assert m.end_slot(s0, K[0], "crc") == 128
    clock.now = 30.5
    assert m.put_start(K[1], 128, "crc")[0] == [Replica("a", "dram", 128, 128)]  # s1's room came back
    assert m.num_slots == 0 and m.num_expired_puts == 1 and m.end_slot(s1, K[2], "crc") == 0


def test_an_instance_that_goes_takes_its_slots():
    m = PoolMaster()
    m.add_instance("a", dram_bytes=256)
    m.add_instance("b", dram_bytes=512)
    slots = m.reserve(128, 2)
    # Most free first: b, then b again (384 free there against a's 256).
    assert [r.instance_id for _, r in slots] == ["b", "b"]
    m.remove_instance("b")
    assert m.num_slots == 0 and m.end_slot(slots[0][0], K[0], "crc") == 0 and not m.exists(K[0])
