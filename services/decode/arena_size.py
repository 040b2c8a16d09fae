"""How many KV blocks a decode worker holds. An explicit `kv_arena_bytes` wins; otherwise enough blocks for
`kv_arena_min_tokens` tokens of this model's KV, capped by `kv_arena_fraction` of the memory available at start
and by the free space of the shared-memory file system the blocks live in. `arena_size` is pure; `machine_memory`
reads the machine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

from tsukimi.common.messages import KVLayout
from tsukimi.common.settings import Settings
from tsukimi.transfer.memory import SHM_DIR

log = logging.getLogger("tsukimi.decode")


@dataclass(frozen=True)
class ArenaSize:
    """A decode KV arena: whole blocks, and why this many."""

    num_blocks: int
    # Bytes and tokens of one block.
    block_bytes: int
    block_tokens: int
    # "explicit" (`kv_arena_bytes`), "auto" (`kv_arena_min_tokens`) or "capped" (auto, cut to the memory cap).
    reason: str
    # Bytes the automatic arena wanted (0 when explicit).
    num_wanted_bytes: int = 0

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_tokens

    def describe(self) -> str:
        return (f"{self.num_blocks} KV blocks of {self.block_tokens} tokens = {self.num_tokens} tokens, "
                f"{self.num_bytes / (1 << 20):.0f} MiB ({self.reason})")


@dataclass(frozen=True)
class MachineMemory:
    """What the machine has room for at start."""

    # Memory available to new allocations without swapping (Linux: MemAvailable).
    num_available_bytes: int
    # Free space of the shared-memory file system (None: none found, no cap).
    num_shm_free_bytes: int | None


def arena_size(block_bytes: int, block_tokens: int, explicit_bytes: int | None, min_tokens: int, fraction: float,
               memory: MachineMemory) -> ArenaSize:
    """The arena for blocks of `block_bytes` holding `block_tokens` tokens each (at least one block)."""
    if explicit_bytes:
        return ArenaSize(max(1, explicit_bytes // block_bytes), block_bytes, block_tokens, "explicit")
    num_wanted = -(-min_tokens // block_tokens)
    cap_bytes = int(memory.num_available_bytes * fraction)
    if memory.num_shm_free_bytes is not None:
        cap_bytes = min(cap_bytes, memory.num_shm_free_bytes)
    num_cap = cap_bytes // block_bytes
    wanted_bytes = num_wanted * block_bytes
    if num_cap < num_wanted:
        return ArenaSize(max(1, num_cap), block_bytes, block_tokens, "capped", wanted_bytes)
    return ArenaSize(num_wanted, block_bytes, block_tokens, "auto", wanted_bytes)


def machine_memory(shm_dir: str = SHM_DIR) -> MachineMemory:
    """The memory available now and the shared-memory space free."""
    try:
        shm_free = psutil.disk_usage(shm_dir).free
    except OSError:
        shm_free = None
    return MachineMemory(psutil.virtual_memory().available, shm_free)


def arena_for(settings: Settings, block: KVLayout) -> ArenaSize:
    """The arena `settings` ask for with blocks of `block` on this machine; logged (a warning when capped)."""
    size = arena_size(block.num_bytes, block.seq_len, settings.kv_arena_bytes, settings.kv_arena_min_tokens,
                      settings.kv_arena_fraction, machine_memory())
    if size.reason == "capped":
        log.warning("decode KV arena: %s, short of the %d tokens (%.0f MiB) of kv_arena_min_tokens: capped at "
                    "%g of the memory available (or the free shared memory); set TSUKIMI_KV_ARENA_BYTES or "
                    "TSUKIMI_KV_ARENA_FRACTION to change it", size.describe(), settings.kv_arena_min_tokens,
                    size.num_wanted_bytes / (1 << 20), settings.kv_arena_fraction)
    else:
        log.info("decode KV arena: %s", size.describe())
    return size
