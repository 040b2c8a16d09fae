"""The prefill worker's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUED = Gauge("tsukimi_prefill_waiting_requests", "Prefill tasks queued")
RUNNING = Gauge("tsukimi_prefill_running_requests", "Prefill tasks computing")
PREFILL_SECONDS = Histogram("tsukimi_prefill_seconds", "Forward time of one prompt",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
TRANSFER_SECONDS = Histogram("tsukimi_prefill_kv_transfer_seconds",
                             "Time from one request's first KV write to decode to its last one done",
                             buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
EXPOSED_SECONDS = Histogram("tsukimi_prefill_kv_transfer_exposed_seconds",
                            "Part of a request's KV transfer after its forward ended (not hidden behind compute)",
                            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
TRANSFER_BYTES = Counter("tsukimi_prefill_kv_transfer_bytes_total", "KV bytes sent to decode workers")
PROMPT_TOKENS = Counter("tsukimi_prefill_prompt_tokens_total", "Prompt tokens computed")
CACHED_TOKENS = Counter("tsukimi_prefill_cached_tokens_total", "Prompt tokens loaded from the KV pool instead")
STORED_BLOCKS = Counter("tsukimi_prefill_stored_blocks_total", "KV blocks written to the pool")
OUTCOMES = Counter("tsukimi_prefill_requests_total", "Prefill tasks by outcome", ["outcome"])
