"""KV caches delivered by prefill workers, held until their decode task arrives (or freed when it never does)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec

from tsukimi.common.expiring import ExpiringSet
from tsukimi.model.kv import KVLayout
from tsukimi.transfer.tcp import TransferError


@dataclass
class Delivery:
    """One request's KV in host memory."""

    layout: KVLayout
    buffer: bytearray
    # Monotonic time it was allocated.
    since: float
    # True once every byte has arrived.
    is_complete: bool = False


class KVInbox:
    """Buffers for incoming KV, within a byte budget; remembers cancelled requests so late KV is refused."""

    def __init__(self, max_bytes: int, orphan_ttl_s: float):
        self.max_bytes = max_bytes
        self.orphan_ttl_s = orphan_ttl_s
        self._deliveries: dict[str, Delivery] = {}
        self._cancelled = ExpiringSet(orphan_ttl_s)
        # Bytes used elsewhere (the running batch), set by the owner; counted against the budget.
        self.num_bytes_in_use_elsewhere = 0

    @property
    def num_bytes(self) -> int:
        return sum(len(d.buffer) for d in self._deliveries.values())

    @property
    def num_free_bytes(self) -> int:
        return max(0, self.max_bytes - self.num_bytes - self.num_bytes_in_use_elsewhere)

    def __len__(self) -> int:
        return len(self._deliveries)

    def allocate(self, key: str, meta: bytes, num_bytes: int) -> bytearray:
        """A buffer for `key`'s KV; raises `TransferError` when refused (cancelled, duplicate, malformed, full)."""
        if key in self._cancelled:
            raise TransferError(f"request {key} was cancelled")
        if key in self._deliveries:
            raise TransferError(f"request {key} already has KV here")
        try:
            layout = msgspec.msgpack.decode(meta, type=KVLayout)
        except msgspec.DecodeError as exc:
            raise TransferError(f"bad KV layout: {exc}") from exc
        if layout.num_bytes != num_bytes:
            raise TransferError(f"layout says {layout.num_bytes} bytes, sender sends {num_bytes}")
        if num_bytes > self.num_free_bytes:
            raise TransferError(f"KV memory full: {num_bytes} bytes asked, {self.num_free_bytes} free")
        delivery = Delivery(layout, bytearray(num_bytes), time.monotonic())
        self._deliveries[key] = delivery
        return delivery.buffer

    def complete(self, key: str) -> None:
        """Marks `key`'s KV as fully arrived."""
        if key in self._deliveries:
            self._deliveries[key].is_complete = True

    def take(self, key: str) -> Delivery | None:
        """Removes and returns `key`'s complete KV, or None when there is none."""
        delivery = self._deliveries.get(key)
        if delivery is None or not delivery.is_complete:
            return None
        return self._deliveries.pop(key)

    def cancel(self, key: str) -> bool:
        """Frees `key`'s KV and refuses any that arrives later; True when something was freed."""
        self._cancelled.add(key)
        return self._deliveries.pop(key, None) is not None

    def sweep(self) -> list[str]:
        """Frees KV whose task never came within the TTL and forgets old cancellations; returns freed keys."""
        now = time.monotonic()
        stale = [k for k, d in self._deliveries.items() if now - d.since > self.orphan_ttl_s]
        for k in stale:
            del self._deliveries[k]
        self._cancelled.prune()
        return stale
