"""The pool master's records: blocks, their replicas, and the changes and evictions it reports.

Plain values (no I/O); `PoolMaster` (master.py) keeps them, the cachestore's pool and servicer pass them on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

TIERS = ("dram", "ssd")


def dram_first(replicas: list[Replica]) -> list[Replica]:
    """A copy of `replicas`, DRAM ones first (most blocks have one replica: no sort)."""
    if len(replicas) == 1:
        return list(replicas)
    return sorted(replicas, key=lambda r: TIERS.index(r.tier))


class PoolError(Exception):
    """A request the pool cannot satisfy (unknown block, no room, leased, ...)."""


class Replica(NamedTuple):
    """Where one copy of a block lives. (Named tuples here: made per block on every put, at half a frozen
    dataclass's cost.)"""

    instance_id: str
    tier: str
    offset: int
    size: int


@dataclass(slots=True)
class Block:
    """One immutable block of KV, keyed by its chained hash."""

    key: bytes
    size: int
    # Checksum the writer computed; readers verify it.
    checksum: str
    replicas: list[Replica]
    # False while being written.
    is_visible: bool = False
    # Lease id -> expiry (monotonic seconds).
    leases: dict[int, float] = field(default_factory=dict)


class Change(NamedTuple):
    """A replica of a visible block appeared (`is_stored`) or went away. A stored replica whose bytes come from
    another replica names it as `source` (demotion to SSD, promotion to DRAM, a raised replica count); the
    instance holding `replica` must copy them before the operation's reply leaves."""

    key: bytes
    replica: Replica
    is_stored: bool
    source: Replica | None = None


class Eviction(NamedTuple):
    """A replica evicted from a tier; `demoted_to` is where its bytes must be copied (SSD), if anywhere."""

    key: bytes
    replica: Replica
    demoted_to: Replica | None
