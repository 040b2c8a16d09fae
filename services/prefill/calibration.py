"""The prefill worker's own cost model: measured at start-up, corrected online from real prefills.

`calibrate` times `PrefillEngine.run` first on three fresh prompts that determine all three coefficients (short,
a quarter of the span, the span: `SPAN_TOKENS` or the model's limit), whatever the time budget, each timed fewer
times when slow; then, while the budget allows (the first fit predicts what each costs), on more shapes, prompts
after a reused prefix among them. `PrefillCosts` fits `CostModel`'s prefill coefficients to those samples plus a
window of the latest real prefills, refitting every few requests, so the published model follows the machine's
actual speed (other processes on the host, a different thread count, ...).
"""

from __future__ import annotations

import logging
import random
import statistics
import time

from tsukimi.common.cost_model import CostModel, CostTracker, Sample, fit_prefill, is_prefill_determined
from tsukimi.prefill.engine import PrefillEngine

log = logging.getLogger("tsukimi.prefill")

# The longest prompt timed at start-up (capped by the model's context): the range the model is trusted in.
SPAN_TOKENS = 1024
# More shapes, as (new, reused) fractions of the span, timed after the three that determine the model while the
# budget allows, most useful first.
EXTRA_SHAPES = ((1 / 16, 15 / 16), (1 / 2, 0), (1 / 4, 1 / 2), (1 / 16, 0), (1 / 8, 1 / 8))
# Seconds calibration may take for the extra shapes (the three that determine the model are always timed).
BUDGET_S = 2.5
# Seconds the three may take at most: a longer span is shrunk (halved) until its predicted time fits.
MAX_S = 30.0
# Timed runs per shape (after one warm-up run of the first shape): fewer for slow ones.
REPEATS = 3
SLOW_RUN_S = 0.1
SLOWER_RUN_S = 0.5


def calibrate(engine: PrefillEngine, max_len: int, budget_s: float = BUDGET_S, seed: int = 0) -> list[Sample]:
    """(new tokens, reused tokens, seconds) samples of `engine.run`: the median of a few runs per shape.

    Shapes are capped by `max_len` (a prompt is shorter than the model's context); the three that determine the
    model come first and are always timed, the extra ones only while `budget_s` allows.
    """
    started = time.perf_counter()
    timer = _Timer(engine, seed)
    samples: list[Sample] = []
    for new in _determining_lengths(max_len - 1):
        if samples:
            new = _shrunk(new, samples[-1], MAX_S - (time.perf_counter() - started))
        samples.append(timer.time(new, 0))
    model = _model_of(samples)
    for new, reused in _extra_shapes(samples[-1][0]):
        if (new, reused) in {(n, r) for n, r, _ in samples} or reused > timer.num_prompt_tokens:
            continue
        if time.perf_counter() - started + model.prefill_s(new, reused) * REPEATS > budget_s:
            continue
        samples.append(timer.time(new, reused))
    log.info("prefill calibrated in %.2fs: %s", time.perf_counter() - started,
             ", ".join(f"{n}+{r}:{t * 1000:.0f}ms" for n, r, t in samples))
    if not is_prefill_determined(samples):
        log.warning("prefill calibration: a context of %d tokens leaves too few shapes for every coefficient; the "
                    "terms they do not tell apart stay at 0", max_len)
    return samples


class _Timer:
    """Times prompts of random tokens; keeps the KV of the longest fresh one as the reused prefix of others."""

    def __init__(self, engine: PrefillEngine, seed: int):
        self.engine = engine
        self.vocab = engine.model.config.get_text_config(decoder=True).vocab_size
        self.rng = random.Random(seed)
        self.prompt: list[int] = []
        self.prompt_kv = None
        self.is_warm = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)

    def time(self, new: int, reused: int) -> Sample:
        prefix = [(k[:, :, :reused].contiguous(), v[:, :, :reused].contiguous()) for k, v in self.prompt_kv] \
            if reused else None
        ids = self.prompt[:reused] + [self.rng.randrange(self.vocab) for _ in range(new)]
        if not self.is_warm:
            self.engine.run(ids, prefix)  # warm-up: first-call allocations and lazy initialisation
            self.is_warm = True
        times: list[float] = []
        while not times or len(times) < _repeats(times[0]):
            run_started = time.perf_counter()
            result = self.engine.run(ids, prefix)
            times.append(time.perf_counter() - run_started)
        if not reused and new > len(self.prompt):
            self.prompt, self.prompt_kv = ids, result.kv
        return new, reused, statistics.median(times)


def _repeats(first_s: float) -> int:
    """Runs a shape gets, from its first one's seconds: REPEATS when fast, 2 when slow, 1 when slower."""
    return REPEATS if first_s < SLOW_RUN_S else 2 if first_s < SLOWER_RUN_S else 1


def _determining_lengths(limit: int) -> list[int]:
    """Three fresh prompt lengths under `limit` that determine the model (fewer when `limit` is tiny)."""
    span = max(1, min(SPAN_TOKENS, limit))
    return sorted({max(1, min(16, span // 16)), max(1, span // 4), span})


def _shrunk(new: int, last: Sample, remaining_s: float) -> int:
    """`new`, halved while its runs (each predicted linear in tokens from the last sample) would exceed
    `remaining_s`, but not below twice the last sample's length, so the three stay apart."""
    last_new, _, last_s = last
    while new > 2 * last_new:
        run_s = last_s * new / last_new
        if run_s * _repeats(run_s) <= remaining_s:
            break
        new //= 2
    return new


def _extra_shapes(span: int) -> list[tuple[int, int]]:
    """EXTRA_SHAPES in tokens for `span`, without empty ones."""
    shapes = []
    for new_share, reused_share in EXTRA_SHAPES:
        new, reused = max(1, int(span * new_share)), int(span * reused_share)
        if new + reused <= span and (new, reused) not in shapes:
            shapes.append((new, reused))
    return shapes


def _model_of(samples: list[Sample]) -> CostModel:
    p0, p1, p2 = fit_prefill(samples)
    return CostModel(prefill_base_s=p0, prefill_per_token_s=p1, prefill_per_pair_s=p2)


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
                         kv_bytes_per_token=self.kv_bytes_per_token, source="measured",
                         prefill_max_tokens=max(n + r for n, r, _ in samples))

    @staticmethod
    def _predict(model: CostModel, size: int, context: int) -> float:
        return model.prefill_s(size, context)


def measure(engine: PrefillEngine, max_len: int, budget_s: float = BUDGET_S) -> PrefillCosts:
    """Calibrates `engine` and returns the cost tracker to publish and correct online."""
    costs = PrefillCosts(calibrate(engine, max_len, budget_s), kv_bytes_per_token(engine))
    m = costs.model
    log.info("prefill cost model: %.2fms + %.3fms/token + %.3fus/pair up to %d tokens (error on its samples: "
             "max %.0f%%, mean %.0f%%)", m.prefill_base_s * 1e3, m.prefill_per_token_s * 1e3,
             m.prefill_per_pair_s * 1e6, m.prefill_max_tokens, costs.error[0] * 100, costs.error[1] * 100)
    return costs
