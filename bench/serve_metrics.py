"""The numbers of one `tsukimi bench serve` run, measured the way the Mooncake paper measures (section 5) and the
way serving benchmarks report (TTFT, TPOT, ITL percentiles, goodput, rejection and prefix hit rates).

- TTFT = first output chunk - scheduled arrival (so client lateness counts against the server, as in open loop);
- TBT per request = mean of its longest 10% inter-token gaps (`tsukimi.sim.outcome.tbt_of`);
- TPOT per request = (last token - first token) / (tokens - 1), tokens from usage; ITL = every inter-chunk gap;
- effective request capacity = share of ALL scheduled requests (rejected, failed and never-sent ones count as
  missing) meeting both SLOs; goodput = those requests per second of the schedule's window.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from tsukimi.bench.serve_record import FAILED, OK, REJECTED, RequestRecord
from tsukimi.sim.outcome import effective_capacity, tbt_of

PERCENTILES = (50, 90, 99)


def distribution(values) -> dict:
    """Mean and p50/p90/p99 of the finite values (None when there are none)."""
    arr = np.asarray(list(values), dtype=float)
    arr = arr[np.isfinite(arr)]
    if not len(arr):
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": round(float(arr.mean()), 4),
            **{f"p{p}": round(float(np.percentile(arr, p)), 4) for p in PERCENTILES}}


def per_request(records: list[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(TTFT s, TBT s) per scheduled request; inf for those that did not complete (rejected, failed)."""
    ttft = np.full(len(records), math.inf)
    tbt = np.full(len(records), math.inf)
    for i, r in enumerate(records):
        times = r.output_times
        if r.outcome != OK or not times:
            continue
        ttft[i] = times[0] - r.arrival_s
        tbt[i] = tbt_of(times)
    return ttft, tbt


def tpot_of(r: RequestRecord) -> float | None:
    """Mean time per output token after the first (None with fewer than two tokens)."""
    times = r.output_times
    n = r.num_output_tokens
    if n < 2 or len(times) < 2:
        return None
    return (times[-1] - times[0]) / (n - 1)


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 4) if seconds > 0 else None


def summarize(records: list[RequestRecord], *, elapsed_s: float, window_s: float, ttft_slo_s: float,
              tbt_slo_s: float) -> dict:
    """The headline numbers of one run."""
    n = len(records)
    ok = [r for r in records if r.outcome == OK]
    rejected = [r for r in records if r.outcome == REJECTED]
    failed = [r for r in records if r.outcome == FAILED]
    ttft, tbt = per_request(records)
    meeting = int(np.sum((ttft <= ttft_slo_s) & (tbt <= tbt_slo_s)))
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    with_usage = [r for r in ok if r.prompt_tokens is not None]
    prompt_tokens = sum(r.prompt_tokens for r in with_usage)
    cached_tokens = sum(r.cached_tokens or 0 for r in with_usage)
    output_tokens = sum(r.num_output_tokens for r in ok)
    chunks = sum(len(r.token_times) for r in ok)
    lag = [r.sent_s - r.arrival_s for r in records if r.sent_s is not None]
    return {
        "num_scheduled": n,
        "num_sent": sum(r.sent_s is not None for r in records),
        "completed": len(ok),
        "rejected": len(rejected),
        "failed": len(failed),
        "failed_by_kind": dict(sorted(Counter(r.error for r in failed).items())),
        "retry_after": dict(sorted(Counter(str(r.retry_after) for r in rejected).items())),
        "rejected_by_message": dict(Counter(str(r.message) for r in rejected).most_common(5)),
        "failure_examples": {r.error: r.message for r in reversed(failed)},
        "rejection_rate": round(len(rejected) / n, 4) if n else None,
        "failure_rate": round(len(failed) / n, 4) if n else None,
        "ttft_s": distribution(ttft),
        "tbt_s": distribution(tbt),
        "tpot_s": distribution(t for t in map(tpot_of, ok) if t is not None),
        "itl_s": distribution(itl),
        "e2e_latency_s": distribution(r.done_s - r.arrival_s for r in ok),
        "meeting_slo": meeting,
        "effective_capacity": round(effective_capacity(ttft, tbt, ttft_slo_s, tbt_slo_s), 4),
        "ttft_slo_attainment": round(float(np.mean(ttft <= ttft_slo_s)), 4) if n else 0.0,
        "tbt_slo_attainment": round(float(np.mean(tbt <= tbt_slo_s)), 4) if n else 0.0,
        "goodput_rps": _rate(meeting, window_s),
        "offered_rate_rps": _rate(n, window_s),
        "request_throughput_rps": _rate(len(ok), elapsed_s),
        "output_throughput_tps": _rate(output_tokens, elapsed_s),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "prefix_hit_rate": round(cached_tokens / prompt_tokens, 4) if prompt_tokens else None,
        "output_tokens": output_tokens,
        "requested_output_tokens": sum(r.max_tokens for r in ok),
        "short_answers": sum(r.num_output_tokens < r.max_tokens for r in ok),
        "finish_reasons": dict(sorted(Counter(str(r.finish_reason) for r in ok).items())),
        "tokens_per_chunk": round(output_tokens / chunks, 4) if chunks else None,
        "send_lag_s": distribution(lag),
        "window_s": round(window_s, 3),
        "elapsed_s": round(elapsed_s, 3),
    }
