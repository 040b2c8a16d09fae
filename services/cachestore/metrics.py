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
