"""The decode KV arena's size: explicit, automatic from the model's KV per token, capped by the memory available
and the free shared memory. Exact block counts for the demo model and SmolLM2-135M's layout."""

import logging

import pytest
from pydantic import ValidationError

from tsukimi.common.messages import KVLayout
from tsukimi.common.settings import Settings
from tsukimi.decode import arena_size as sizing
from tsukimi.decode.arena_size import MachineMemory, arena_for, arena_size, machine_memory

GIB = 1 << 30
MIB = 1 << 20
# One 64-token block: the demo model (8 layers, 2 KV heads, head dim 64, float32) and SmolLM2-135M (30, 3, 64).
DEMO = KVLayout(8, 2, 64, 64, "float32")
SMOL = KVLayout(30, 3, 64, 64, "float32")
PLENTY = MachineMemory(num_available_bytes=64 * GIB, num_shm_free_bytes=None)


def test_block_sizes_of_the_two_models():
    assert DEMO.num_bytes == 64 * 8192 == 524_288
    assert SMOL.num_bytes == 64 * 46_080 == 2_949_120


def test_auto_holds_the_minimum_tokens_in_whole_blocks():
    demo = arena_size(DEMO.num_bytes, 64, None, 16 * 2048, 0.3, PLENTY)
    assert (demo.num_blocks, demo.num_tokens, demo.num_bytes, demo.reason) == (512, 32_768, 256 * MIB, "auto")
    smol = arena_size(SMOL.num_bytes, 64, None, 16 * 2048, 0.3, PLENTY)
    assert (smol.num_blocks, smol.num_tokens, smol.num_bytes, smol.reason) == (512, 32_768, 1_509_949_440, "auto")
    # A minimum that is not a whole number of blocks rounds up.
    assert arena_size(DEMO.num_bytes, 64, None, 100, 0.3, PLENTY).num_blocks == 2


def test_explicit_bytes_win_even_over_the_cap():
    # The default of earlier versions (256 MiB) holds 91 SmolLM blocks: 5,824 tokens.
    smol = arena_size(SMOL.num_bytes, 64, 256 * MIB, 16 * 2048, 0.3, MachineMemory(MIB, MIB))
    assert (smol.num_blocks, smol.num_tokens, smol.reason) == (91, 5_824, "explicit")
    assert arena_size(SMOL.num_bytes, 64, MIB, 16 * 2048, 0.3, PLENTY).num_blocks == 1  # at least one


def test_auto_is_capped_by_a_fraction_of_available_memory_and_by_free_shared_memory():
    # 0.3 of 4 GiB = 1,288,490,188 bytes: 436 SmolLM blocks (437 would be 1,288,765,440).
    capped = arena_size(SMOL.num_bytes, 64, None, 16 * 2048, 0.3, MachineMemory(4 * GIB, None))
    assert (capped.num_blocks, capped.num_tokens, capped.reason) == (436, 27_904, "capped")
    assert capped.num_wanted_bytes == 1_509_949_440
    # Free shared memory caps it too (a container's small /dev/shm): 100 MiB = 35 blocks.
    shm = arena_size(SMOL.num_bytes, 64, None, 16 * 2048, 0.3, MachineMemory(64 * GIB, 100 * MIB))
    assert (shm.num_blocks, shm.reason) == (35, "capped")
    assert arena_size(SMOL.num_bytes, 64, None, 16 * 2048, 0.3, MachineMemory(MIB, None)).num_blocks == 1
    # Room for exactly the target: not capped.
    exact = MachineMemory(num_available_bytes=10 * 1_509_949_440, num_shm_free_bytes=1_509_949_440)
    assert arena_size(SMOL.num_bytes, 64, None, 16 * 2048, 0.1, exact).reason == "auto"


def test_machine_memory_reads_available_memory_and_shared_memory(tmp_path):
    memory = machine_memory(str(tmp_path))
    assert memory.num_available_bytes > 0 and memory.num_shm_free_bytes > 0
    assert machine_memory(str(tmp_path / "missing")).num_shm_free_bytes is None


def test_arena_for_reads_settings_and_warns_when_capped(monkeypatch, caplog):
    monkeypatch.setattr(sizing, "machine_memory", lambda: MachineMemory(4 * GIB, None))
    with caplog.at_level(logging.INFO, logger="tsukimi.decode"):
        size = arena_for(Settings(), SMOL)
    assert (size.num_blocks, size.reason) == (436, "capped")
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "436 KV blocks of 64 tokens = 27904 tokens, 1226 MiB (capped)" in warning[0].message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tsukimi.decode"):
        size = arena_for(Settings(kv_arena_bytes=64 * MIB), DEMO)
    assert (size.num_blocks, size.reason) == (128, "explicit")
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "128 KV blocks of 64 tokens = 8192 tokens, 64 MiB (explicit)" in caplog.records[0].message


def test_arena_settings(monkeypatch):
    assert Settings().kv_arena_bytes is None
    assert (Settings().kv_arena_min_tokens, Settings().kv_arena_fraction) == (32_768, 0.3)
    assert Settings(kv_arena_bytes=0).kv_arena_bytes is None
    monkeypatch.setenv("TSUKIMI_KV_ARENA_BYTES", str(512 * MIB))
    assert Settings().kv_arena_bytes == 512 * MIB
    for bad in (dict(kv_arena_bytes=1000), dict(kv_arena_fraction=0), dict(kv_arena_fraction=1.5),
                dict(kv_arena_min_tokens=0)):
        with pytest.raises(ValidationError):
            Settings(**bad)
