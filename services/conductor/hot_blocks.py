"""Which cached blocks are hot: how many requests wanted each block key within a sliding window, and the DRAM
replica count that demand calls for. Pure; the conductor turns the differences into ChangeReplicas calls, so hot
prefixes spread over more cachestores (and more memory bandwidth) and cold ones shrink back to one copy.
"""

from __future__ import annotations

from collections import Counter, deque


class HotBlocks:
    """Demand per block key over the last `window_s` seconds; one more replica per `requests_per_replica`."""

    def __init__(self, window_s: float = 60.0, requests_per_replica: int = 8, max_keys_per_request: int = 64):
        self.window_s = window_s
        self.requests_per_replica = requests_per_replica
        self.max_keys_per_request = max_keys_per_request
        self._seen: deque[tuple[float, tuple[bytes, ...]]] = deque()
        self._counts: Counter[bytes] = Counter()
        # Keys whose count changed since the last `targets` call.
        self._dirty: set[bytes] = set()

    def observe(self, keys: list[bytes], now: float) -> None:
        """A request wants these leading block keys (only the first `max_keys_per_request` count: a shared
        prefix is where the heat is)."""
        kept = tuple(keys[: self.max_keys_per_request])
        self._seen.append((now, kept))
        self._counts.update(kept)
        self._dirty.update(kept)
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._seen and self._seen[0][0] <= now - self.window_s:
            _, keys = self._seen.popleft()
            self._counts.subtract(keys)
            for key in keys:
                if self._counts[key] <= 0:
                    del self._counts[key]
            self._dirty.update(keys)

    def demand(self, key: bytes) -> int:
        """Requests that wanted `key` within the window."""
        return self._counts.get(key, 0)

    def targets(self, now: float, max_replicas: int) -> dict[bytes, int]:
        """Wanted DRAM replica count (1..max_replicas) of every key whose demand changed since the last call."""
        self._expire(now)
        dirty, self._dirty = self._dirty, set()
        return {key: max(1, min(max_replicas, 1 + self.demand(key) // self.requests_per_replica)) for key in dirty}
