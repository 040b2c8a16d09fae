"""The transfer engine's Prometheus metrics."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

from tsukimi.transfer.batch import Op

BYTES = Counter("tsukimi_transfer_bytes_total", "Bytes moved by the transfer engine", ["transport", "op"])
REQUESTS = Counter("tsukimi_transfer_requests_total", "Transfer requests by outcome", ["transport", "status"])
PEER_TRANSPORT = Gauge("tsukimi_transfer_peer_transport", "Transport chosen for a peer (1)", ["peer", "transport"])
BATCH_SECONDS = Histogram("tsukimi_transfer_batch_seconds", "Submission to completion of a batch",
                          buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))


@functools.cache
def bytes_counter(transport: str, op: Op):
    return BYTES.labels(transport, op.name)


@functools.cache
def requests_counter(transport: str, status: str):
    return REQUESTS.labels(transport, status)
