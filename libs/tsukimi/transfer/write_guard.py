"""Who may write where in a registered buffer: a table of owner tags, one per fixed-size unit of the buffer.

The buffer's owner (its application) assigns units to a writer by giving them that writer's tag (a nonzero
64-bit number it hands the writer along with the units) and clears them (tag 0) before it reuses them. A WRITE
into a guarded buffer must carry a tag, and lands only where every unit it touches holds that tag: a writer whose
units were taken back (freed, or given to another writer) is refused instead of overwriting the new owner's bytes.

Where the check happens:
- tcp: the target's server checks the table before receiving a slice's payload into the buffer.
- shm: the writer copies straight into the target's shared memory, so the table is shared memory too, mapped
  read-only by same-host peers; the writer checks it right before each copy (of at most the engine's shm slice).
- rdma: one-sided writes cannot be checked by either side; the engine does not use rdma for guarded buffers.

NOTE (the remaining race, both paths): the check and the copy are two steps. A write checked just before its
units are cleared still lands; the window is one slice's copy (shm, ~0.1 ms for 1 MiB) or receive (tcp, from the
check to the slice's last byte). A writer the owner stopped waiting for must be inside that window at the very
moment its units are cleared, and the new owner's writes into them must land before its stale one ends. An owner
that keeps cleared units unused for a while before it assigns them again (decode keeps a swept reservation's blocks
for a TTL) leaves only a copy stalled that long mid-way.
"""

from __future__ import annotations

from collections.abc import Iterable

from tsukimi.transfer.memory import SharedRegion

TAG_BYTES = 8


def num_units(buffer_length: int, unit_bytes: int) -> int:
    """Units of `unit_bytes` covering a buffer of `buffer_length` bytes (the last one may be partial)."""
    return -(-buffer_length // unit_bytes)


def refusal(owners: memoryview, unit_bytes: int, offset: int, length: int, tag: int) -> str:
    """"" when a WRITE of [offset, offset + length) (inside the buffer) carrying `tag` may land, i.e. `tag` owns
    every unit it touches; else why not. `owners`: the table as a memoryview of uint64 ('Q')."""
    first = offset // unit_bytes
    last = (offset + length - 1) // unit_bytes
    if first == last and tag and owners[first] == tag:
        return ""  # NOTE: the common case (a layer's slice of one block) without the loop: ~0.3 us, not ~1 us.
    if not tag:
        return "the buffer is write-guarded and the write carries no owner tag"
    for unit in range(first, last + 1):
        owner = owners[unit]
        if owner != tag:
            state = "free" if owner == 0 else "owned by another writer"
            return f"unit {unit} of {unit_bytes} bytes is {state}, not the writer's (tag {tag:#x}): write refused"
    return ""


class WriteGuard:
    """The owner's side of a guarded buffer: the table in shared memory (peers on this host map it)."""

    def __init__(self, buffer_length: int, unit_bytes: int):
        if unit_bytes < 1:
            raise ValueError(f"a write guard's unit must be at least 1 byte, not {unit_bytes}")
        self.unit_bytes = unit_bytes
        self.num_units = num_units(buffer_length, unit_bytes)
        self.region = SharedRegion.create(self.num_units * TAG_BYTES)
        # NOTE: one aligned 8-byte store per entry (atomic on the CPUs this runs on): a peer reads either tag.
        self.owners = self.region.view.cast("Q")

    def assign(self, units: Iterable[int], tag: int) -> None:
        """Gives `units` to the writer carrying `tag` (nonzero)."""
        if not tag:
            raise ValueError("an owner tag must be nonzero")
        owners = self.owners
        for unit in units:
            owners[unit] = tag

    def clear(self, units: Iterable[int]) -> None:
        """Takes `units` back: writes into them are refused from now on (see the module's NOTE)."""
        owners = self.owners
        for unit in units:
            owners[unit] = 0

    def owner(self, unit: int) -> int:
        """The tag `unit` accepts writes from (0: none)."""
        return self.owners[unit]

    def refusal(self, offset: int, length: int, tag: int) -> str:
        """"" when a WRITE of [offset, offset + length) carrying `tag` may land, else why not."""
        return refusal(self.owners, self.unit_bytes, offset, length, tag)

    def close(self) -> None:
        self.owners.release()
        self.region.close()
