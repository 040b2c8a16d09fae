"""The decode instance's block free list, with exact expectations."""

import pytest

from tsukimi.decode.block_manager import BlockManager, NoFreeBlocks


def test_allocates_lowest_first_and_reuses_freed_last():
    manager = BlockManager(4)
    assert manager.allocate(2) == [0, 1]
    assert manager.allocate(1) == [2]
    manager.free([0])
    assert manager.num_free_blocks == 2
    assert manager.allocate(2) == [3, 0]
    assert manager.num_free_blocks == 0


def test_all_or_nothing_and_bad_frees_change_nothing():
    manager = BlockManager(3)
    held = manager.allocate(2)
    with pytest.raises(NoFreeBlocks):
        manager.allocate(2)
    assert manager.num_free_blocks == 1 and manager.can_allocate(1) and not manager.can_allocate(2)
    for bad in ([2], [0, 0], [5], [0, 2]):
        with pytest.raises(ValueError):
            manager.free(bad)
    assert manager.num_free_blocks == 1
    manager.free(held)
    assert manager.num_free_blocks == 3
    assert manager.allocate(0) == []
