"""The tier's LRU index: exact eviction order, watermark, pins."""

import pytest

from tsukimi.cachestore.lru_index import LruBlockIndex, TierFull


def test_prefix_match_touches_and_lru_order_decides_eviction():
    idx = LruBlockIndex(capacity=10, high_watermark=0.9, evict_share=0.2)
    for key in "abcdefgh":
        assert idx.insert(key, 1) == []
    assert idx.match_prefix(["a", "b", "z", "c"]) == 2  # a, b now most recent
    assert idx.insert("i", 1) == []  # 9 of 10: at the watermark, not past it
    # 10 > 0.9 * 10 -> evict oldest until used <= 10 - 0.2 * 10 = 8: c and d go.
    assert idx.insert("j", 1) == ["c", "d"]
    assert idx.used == 8 and "a" in idx and "c" not in idx
    assert idx.num_evictions == 2


def test_pins_are_never_evicted_and_full_is_refused():
    idx = LruBlockIndex(capacity=4, high_watermark=1.0, evict_share=0.5)
    for key in "abcd":
        idx.insert(key, 1)
    idx.pin("a")
    idx.pin("b")
    assert idx.insert("e", 1) == ["c"]  # a, b pinned: c is the oldest evictable
    idx.pin("d")
    idx.pin("e")
    with pytest.raises(TierFull):
        idx.insert("f", 1)
    assert idx.remove("a") is False
    idx.unpin("a")
    assert idx.remove("a") is True and idx.used == 3
    with pytest.raises(KeyError):
        idx.unpin("a")


def test_unbounded_never_evicts_and_refresh_is_free():
    idx = LruBlockIndex(capacity=None)
    for i in range(10_000):
        idx.insert(i, 512)
    assert idx.insert(5, 512) == [] and idx.used == 10_000 * 512 and idx.num_evictions == 0


def test_num_leading_peeks_without_touching_lru_order():
    idx = LruBlockIndex(capacity=4, high_watermark=1.0, evict_share=0.25)
    for key in "abcd":
        idx.insert(key, 1)
    assert idx.num_leading(["a", "b", "z", "c"]) == 2
    assert idx.num_leading([]) == 0 and idx.num_leading(["z", "a"]) == 0
    # Unlike match_prefix, the peek left "a" the oldest: it is evicted first.
    assert idx.insert("e", 1) == ["a"]
    assert idx.match_prefix(["b"]) == 1 and idx.insert("f", 1) == ["c"]


def test_touch_makes_one_block_the_newest_and_ignores_absent_ones():
    idx = LruBlockIndex(capacity=3, high_watermark=1.0, evict_share=1 / 3)
    for key in "abc":
        idx.insert(key, 1)
    idx.touch("a")
    idx.touch("z")
    assert "z" not in idx and len(idx) == 3
    assert idx.insert("d", 1) == ["b"]
