"""The cachestore's Prometheus metrics (exported on its probe server's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

UP = Gauge("tsukimi_cachestore_up", "1 while the cachestore serves (gRPC health SERVING), 0 otherwise")
IS_MASTER = Gauge("tsukimi_cachestore_is_master", "1 while this instance is the pool master")
HITS = Counter("tsukimi_cachestore_hits_total", "Block gets that found the block in DRAM (after promotion)")
MISSES = Counter("tsukimi_cachestore_misses_total", "Block gets that did not")
EVICTIONS = Counter("tsukimi_cachestore_evictions_total", "Replicas evicted from a tier (LRU)")
BAD_REPLICAS = Counter("tsukimi_cachestore_bad_replicas_total", "Replicas dropped after a failed checksum")
PUTS = Counter("tsukimi_cachestore_puts_total", "Two-phase puts by outcome", ["outcome"])
PUT_BYTES = Counter("tsukimi_cachestore_put_bytes_total", "Bytes of blocks made visible by puts")
GET_BYTES = Counter("tsukimi_cachestore_get_bytes_total", "Bytes of blocks handed out to readers")
RPC_SECONDS = Histogram("tsukimi_cachestore_rpc_seconds", "Metadata call latency at the master", ["method"],
                        buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
TIER_CAPACITY = Gauge("tsukimi_cachestore_tier_capacity_bytes", "Bytes a tier contributes", ["instance", "tier"])
TIER_USED = Gauge("tsukimi_cachestore_tier_used_bytes", "Bytes held by visible blocks", ["instance", "tier"])
TIER_BLOCKS = Gauge("tsukimi_cachestore_tier_blocks", "Visible blocks held", ["instance", "tier"])


class MasterExport:
    """Exports a master's counters (what they grew by since the last export) and its per-tier usage; a new one
    per pool, whose counters start at 0."""

    def __init__(self):
        self._num_evictions = 0
        self._num_expired_puts = 0

    def export(self, master) -> None:
        """Sets the per-tier gauges and adds the evictions and expired puts since the last call."""
        EVICTIONS.inc(master.num_evictions - self._num_evictions)
        self._num_evictions = master.num_evictions
        PUTS.labels("expired").inc(master.num_expired_puts - self._num_expired_puts)
        self._num_expired_puts = master.num_expired_puts
        for iid, tier, capacity, used, num_blocks in master.tier_usage():
            TIER_CAPACITY.labels(iid, tier).set(capacity)
            TIER_USED.labels(iid, tier).set(used)
            TIER_BLOCKS.labels(iid, tier).set(num_blocks)
