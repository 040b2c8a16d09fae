"""The prefill worker's own cost model: measured at start-up, corrected online from real prefills.

`calibrate` times `PrefillEngine.run` on a few prompt shapes (fresh prompts and prompts after a reused prefix)
within a time budget; `PrefillCosts` fits `CostModel`'s prefill coefficients to those samples plus a window of
the latest real prefills, refitting every few requests, so the published model follows the machine's actual
speed (other processes on the host, a different thread count, ...).
"""

from __future__ import annotations

import logging
import random
import statistics
import time

from tsukimi.common.cost_model import CostModel, CostTracker, Sample, fit_prefill
from tsukimi.prefill.engine import PrefillEngine

log = logging.getLogger("tsukimi.prefill")

# (new tokens, reused tokens) timed at start-up, cheapest first; a reused prefix comes from an earlier run.
SHAPES = ((16, 0), (64, 0), (256, 0), (64, 256), (512, 0), (16, 512))
# Seconds calibration may take (checked before each shape, from the cost of the previous one).
BUDGET_S = 2.5
# Timed repetitions per shape (after one warm-up run of the first shape); fewer for slow shapes.
REPEATS = 3
SLOW_REPEATS = 2
SLOW_RUN_S = 0.1


def calibrate(engine: PrefillEngine, max_len: int, budget_s: float = BUDGET_S, seed: int = 0) -> list[Sample]:
    """(new tokens, reused tokens, seconds) samples of `engine.run`: the median of a few runs per shape.

    Shapes are capped by `max_len` (a prompt is shorter than the model's context) and skipped once the budget
    would be exceeded; at least the first shape is always measured.
    """
    vocab = engine.model.config.get_text_config(decoder=True).vocab_size
    rng = random.Random(seed)
    started = time.perf_counter()
    samples: list[Sample] = []
    # KV of the longest fresh prompt run so far: its first tokens serve as the reused prefix of later shapes.
    prompt: list[int] = []
    prompt_kv = None
    last_new, last_run_s = 0, 0.0
    for new, reused in _shapes(max_len - 1):
        if reused > len(prompt):
            continue
        estimate = last_run_s * new / last_new * SLOW_REPEATS if last_new else 0.0
        if samples and time.perf_counter() - started + estimate > budget_s:
            break
        prefix = [(k[:, :, :reused].contiguous(), v[:, :, :reused].contiguous()) for k, v in prompt_kv] \
            if reused else None
        ids = prompt[:reused] + [rng.randrange(vocab) for _ in range(new)]
        if not samples:
            engine.run(ids, prefix)  # warm-up: first-call allocations and lazy initialisation
        times, result = [], None
        for i in range(REPEATS):
            run_started = time.perf_counter()
            result = engine.run(ids, prefix)
            times.append(time.perf_counter() - run_started)
            if i + 1 >= SLOW_REPEATS and times[0] > SLOW_RUN_S:
                break
        samples.append((new, reused, statistics.median(times)))
        last_new, last_run_s = new, statistics.median(times)
        if not reused and new > len(prompt):
            prompt, prompt_kv = ids, result.kv
        del result
    log.info("prefill calibrated in %.2fs: %s", time.perf_counter() - started,
             ", ".join(f"{n}+{r}:{t * 1000:.0f}ms" for n, r, t in samples))
    return samples


def _shapes(limit: int) -> list[tuple[int, int]]:
    """SHAPES fitted under `limit` tokens per prompt, without duplicates."""
    shapes: list[tuple[int, int]] = []
    for new, reused in SHAPES:
        new = min(new, limit)
        reused = min(reused, limit - new)
        if new > 0 and (new, reused) not in shapes:
            shapes.append((new, reused))
    return shapes


def kv_bytes_per_token(engine: PrefillEngine) -> int:
    """Bytes of KV one token of this model takes."""
    return engine.block_layout(1).num_bytes


class PrefillCosts(CostTracker):
    """The current prefill cost model: calibration samples plus a window of recent real prefills."""

    def __init__(self, calibration: list[Sample], kv_bytes_per_token: int, window: int = 64,
                 refit_every: int = 8):
        super().__init__(calibration, kv_bytes_per_token, window, refit_every)

    def _fit(self, samples: list[Sample]) -> CostModel:
        p0, p1, p2 = fit_prefill(samples)
        return CostModel(prefill_base_s=p0, prefill_per_token_s=p1, prefill_per_pair_s=p2,
                         kv_bytes_per_token=self.kv_bytes_per_token, source="measured")


def measure(engine: PrefillEngine, max_len: int, budget_s: float = BUDGET_S) -> PrefillCosts:
    """Calibrates `engine` and returns the cost tracker to publish and correct online."""
    costs = PrefillCosts(calibrate(engine, max_len, budget_s), kv_bytes_per_token(engine))
    m = costs.model
    log.info("prefill cost model: %.2fms + %.3fms/token + %.3fus/pair", m.prefill_base_s * 1e3,
             m.prefill_per_token_s * 1e3, m.prefill_per_pair_s * 1e6)
    return costs
