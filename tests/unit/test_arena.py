"""The decode KV arena allocator: exact offsets, coalescing, exhaustion."""

import pytest

from tsukimi.common.arena import ArenaAllocator, ArenaFull


def test_first_fit_alignment_and_exact_offsets():
    a = ArenaAllocator(1024)
    assert a.allocate(100) == 0      # rounded to 128
    assert a.allocate(64) == 128
    assert a.allocate(1) == 192
    assert a.num_free_bytes == 1024 - 256 and a.num_allocations == 3


def test_free_coalesces_both_sides_and_reuses_first_fit():
    a = ArenaAllocator(1024)
    x, y, z = a.allocate(128), a.allocate(128), a.allocate(128)
    a.free(x)
    a.free(z)  # merges with the tail
    assert a.num_free_bytes == 1024 - 128
    assert a.allocate(64) == 0       # first fit: the hole at 0
    a.free(0)
    a.free(y)  # merges 0..128, 128..256 and 256..1024 into one range
    assert a.num_free_bytes == 1024 and a.num_allocations == 0
    assert a.allocate(1024) == 0


def test_full_and_bad_sizes():
    a = ArenaAllocator(256)
    a.allocate(192)
    with pytest.raises(ArenaFull):
        a.allocate(128)
    assert a.allocate(64) == 192
    with pytest.raises(ValueError):
        a.allocate(0)
    with pytest.raises(KeyError):
        a.free(7)
