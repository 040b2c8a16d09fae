"""What a serving simulation measured, the way the Mooncake paper measures it (section 5):

- TTFT = first token out - arrival;
- TBT = mean of the request's longest 10% inter-token gaps (at least one gap: max(1, gaps // 10) of them; a request
  with one output token has TBT 0);
- effective request capacity = share of ALL the trace's requests (rejected ones fail) meeting both SLOs.
"""

from __future__ import annotations

import math

import numpy as np

from tsukimi.sim.workload import SimRequest

# TBT thresholds of the capacity-versus-threshold curve (s).
TBT_THRESHOLDS = tuple(round(0.05 + 0.025 * i, 3) for i in range(19))  # 0.05 .. 0.5


def token_times(r: SimRequest) -> list[float]:
    """When each of its output tokens was out (empty if it never produced one)."""
    if r.first_token_at is None:
        return []
    if r.token_log is None:
        return [r.first_token_at]
    return [r.first_token_at, *r.token_log[r.first_step:r.first_step + r.num_output_tokens - 1]]


def tbt_of(times: list[float]) -> float:
    """Mean of the longest 10% inter-token gaps (at least one); 0 with fewer than two tokens."""
    if len(times) < 2:
        return 0.0
    gaps = np.diff(np.asarray(times, dtype=float))
    k = max(1, len(gaps) // 10)
    if k >= len(gaps):
        return float(gaps.mean())
    return float(np.partition(gaps, len(gaps) - k)[len(gaps) - k:].mean())


def per_request(requests: list[SimRequest]) -> tuple[np.ndarray, np.ndarray]:
    """(TTFT s, TBT s) per request; inf for requests rejected or never finished."""
    ttft = np.full(len(requests), math.inf)
    tbt = np.full(len(requests), math.inf)
    for i, r in enumerate(requests):
        if r.rejected or r.done_at is None:
            continue
        times = token_times(r)
        if len(times) != r.num_output_tokens:
            continue
        ttft[i] = r.first_token_at - r.arrival
        tbt[i] = tbt_of(times)
    return ttft, tbt


def effective_capacity(ttft: np.ndarray, tbt: np.ndarray, ttft_slo_s: float, tbt_slo_s: float) -> float:
    """Share of all requests meeting both SLOs."""
    if not len(ttft):
        return 0.0
    return float(np.mean((ttft <= ttft_slo_s) & (tbt <= tbt_slo_s)))


def capacity_curve(ttft: np.ndarray, tbt: np.ndarray, ttft_slo_s: float,
                   thresholds: tuple[float, ...] = TBT_THRESHOLDS) -> list[tuple[float, float]]:
    """(TBT threshold, effective capacity) pairs at a fixed TTFT SLO."""
    return [(t, round(effective_capacity(ttft, tbt, ttft_slo_s, t), 4)) for t in thresholds]


def _stats(values: np.ndarray, name: str) -> dict:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {f"avg_{name}_s": None, **{f"p{p}_{name}_s": None for p in (50, 90, 99)}}
    out = {f"avg_{name}_s": round(float(finite.mean()), 4)}
    for p in (50, 90, 99):
        out[f"p{p}_{name}_s"] = round(float(np.percentile(finite, p)), 4)
    return out


def summarize(requests: list[SimRequest], ttft_slo_s: float, tbt_slo_s: float) -> dict:
    """The headline numbers of a run (TTFT and TBT statistics over completed requests)."""
    ttft, tbt = per_request(requests)
    reasons: dict[str, int] = {}
    for r in requests:
        if r.rejected:
            reasons[r.rejected] = reasons.get(r.rejected, 0) + 1
    admitted = [r for r in requests if not r.rejected]
    prompt = sum(r.num_prompt_tokens for r in admitted)
    reused = sum(r.reused_tokens for r in admitted)
    fetched = sum(r.fetched_tokens for r in admitted)
    return {
        "num_requests": len(requests),
        "completed": int(np.isfinite(ttft).sum()),
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        **_stats(ttft, "ttft"),
        **_stats(tbt, "tbt"),
        "effective_capacity": round(effective_capacity(ttft, tbt, ttft_slo_s, tbt_slo_s), 4),
        "effective_capacity_at_tbt": {str(t): round(effective_capacity(ttft, tbt, ttft_slo_s, t), 4)
                                      for t in (0.1, 0.2, 0.3)},
        "token_hit_ratio": round(reused / max(1, prompt), 4),
        "remote_hit_ratio": round(fetched / max(1, prompt), 4),
        "prefill_compute_s": round(sum(r.prefill_s for r in admitted), 3),
    }
