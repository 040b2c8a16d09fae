"""The figures of one Mooncake Store op: throughput, per-call latency, the result record and return codes."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from harness.mooncake.store_spec import API_CALLS, SYSTEM, MooncakeStoreBenchError

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of already sorted values; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_s: Iterable[float]) -> dict:
    """Per-call latency in microseconds: mean, p50, p90, p99, max."""
    values = sorted(latencies_s)
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    us = 1e6
    return {
        "mean": round(sum(values) / len(values) * us, 1),
        "p50": round(percentile(values, 50) * us, 1),
        "p90": round(percentile(values, 90) * us, 1),
        "p99": round(percentile(values, 99) * us, 1),
        "max": round(values[-1] * us, 1),
    }


def throughput(ops: int, block_size: int, elapsed_s: float) -> tuple[float, float]:
    """(ops/s, GB/s of 1e9 bytes/s) for `ops` objects of `block_size` bytes in `elapsed_s`."""
    if elapsed_s <= 0:
        raise ValueError("elapsed_s must be positive")
    return ops / elapsed_s, ops * block_size / elapsed_s / 1e9


def make_result(
    op: str,
    block_size: int,
    batch: bool,
    batch_size: int,
    ops: int,
    calls: int,
    elapsed_s: float,
    latencies_s: Iterable[float],
    api: str,
    **extra,
) -> dict:
    """One result record in the shape `tsukimi bench cachestore` compares."""
    ops_per_s, gb_per_s = throughput(ops, block_size, elapsed_s)
    return {
        "system": SYSTEM,
        "op": op,
        "block_size": block_size,
        "batch": batch,
        "batch_size": batch_size,
        "ops_per_s": round(ops_per_s, 1),
        "gb_per_s": round(gb_per_s, 4),
        "ops": ops,
        "calls": calls,
        "bytes": ops * block_size,
        "elapsed_s": round(elapsed_s, 4),
        "call_latency_us": latency_summary(latencies_s),
        "api": api,
        "calls_used": API_CALLS[(api, batch, op)],
        **extra,
    }


def check_status(what: str, status) -> None:
    """Raise MooncakeStoreBenchError unless a store return value means success.

    put/put_batch/put_from return an int (0 = ok, negative = error code); batch_put_from a list
    of them; get_into/batch_get_into return byte counts (negative = error)."""
    values = status if isinstance(status, (list, tuple)) else [status]
    bad = [v for v in values if not isinstance(v, int) or v < 0]
    if bad:
        raise MooncakeStoreBenchError(f"{what} failed: return value(s) {bad[:8]}")
