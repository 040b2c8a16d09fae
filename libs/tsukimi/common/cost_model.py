"""Predicted times of a model instance: the cost model the conductor places requests with, the simulator runs
instances on, and the workers fit from their own measurements and publish in their heartbeats.

Transformer compute is regular, so low-order polynomials predict it well:
- prefill of `new` tokens after `reused` cached ones: `p0 + p1 * new + p2 * new * (reused + new / 2)` (linear
  layers per token; attention per pair of a new token and a token it attends to);
- one decode step of a batch of `batch` sequences holding `context` tokens in all:
  `d0 + d1 * batch + d2 * context` (weights read once per step, per-sequence work, KV read per token).

Fits minimise the relative error (a 10 ms shape counts as much as a 1 s one) with coefficients >= 0, over only the
terms the samples determine: never a least squares with fewer samples than unknowns. A measured model carries the
range it was fitted on; `bounded_prefill_s` is what a refusal may rest on beyond it.

Pure: no torch; numpy only for fitting.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from itertools import combinations

import msgspec
import numpy as np

log = logging.getLogger("tsukimi.cost_model")

# One timing: (new tokens, reused tokens, seconds) for prefill, (batch size, context tokens, seconds) for decode.
Sample = tuple[int, int, float]


class CostModel(msgspec.Struct, frozen=True, kw_only=True):
    """Coefficients in seconds; see the module docstring for the formulas."""

    # Prefill: fixed cost per forward.
    prefill_base_s: float = 0.0
    # Prefill: per new token.
    prefill_per_token_s: float = 0.0
    # Prefill: per (new token, attended token) pair.
    prefill_per_pair_s: float = 0.0
    # Decode step: fixed cost (weights read once).
    decode_base_s: float = 0.0
    # Decode step: per sequence in the batch.
    decode_per_seq_s: float = 0.0
    # Decode step: per context token in the batch (KV read).
    decode_per_context_token_s: float = 0.0
    # KV cache bytes per token (transfer sizes).
    kv_bytes_per_token: int = 0
    # Where the coefficients come from ("measured", "roofline:<model>/<gpu>", "default").
    source: str = "default"
    # Largest prompt (new + reused tokens) among the prefill timings fitted; 0: not measured (no bound).
    prefill_max_tokens: int = 0
    # Largest batch among the decode timings fitted; 0: not measured.
    decode_max_batch_size: int = 0
    # Largest batch context (tokens of all its sequences) among the decode timings fitted; 0: not measured.
    decode_max_context_tokens: int = 0

    def prefill_s(self, num_new_tokens: int, num_reused_tokens: int = 0) -> float:
        """Predicted prefill time of `num_new_tokens` after `num_reused_tokens` cached ones."""
        if num_new_tokens <= 0:
            return 0.0
        pairs = num_new_tokens * (num_reused_tokens + num_new_tokens / 2)
        return self.prefill_base_s + self.prefill_per_token_s * num_new_tokens + self.prefill_per_pair_s * pairs

    def bounded_prefill_s(self, num_new_tokens: int, num_reused_tokens: int = 0) -> float:
        """The prefill time a refusal may rest on: `prefill_s` within the measured range; beyond it
        (`num_new_tokens + num_reused_tokens` over `prefill_max_tokens`), at most the linear extrapolation from
        the range's edge along the same prompt, `s * prefill_s(new / s, reused / s)` with `s` = tokens / range:
        the pair term's quadratic growth past what was timed is not trusted to refuse a request. Decode steps need
        no such bound: `decode_step_s` is linear, so beyond its range it already is that extrapolation."""
        num_tokens = num_new_tokens + num_reused_tokens
        predicted = self.prefill_s(num_new_tokens, num_reused_tokens)
        if self.prefill_max_tokens <= 0 or num_tokens <= self.prefill_max_tokens:
            return predicted
        s = num_tokens / self.prefill_max_tokens
        return min(predicted, s * self.prefill_s(num_new_tokens / s, num_reused_tokens / s))

    def decode_step_s(self, batch_size: int, num_context_tokens: int) -> float:
        """Predicted time of one decode step (= TBT) of a batch."""
        if batch_size <= 0:
            return 0.0
        return (self.decode_base_s + self.decode_per_seq_s * batch_size
                + self.decode_per_context_token_s * num_context_tokens)

    def scaled(self, prefill_factor: float = 1.0, decode_factor: float = 1.0) -> "CostModel":
        """The same model with every prefill (decode) coefficient multiplied: online correction."""
        return msgspec.structs.replace(
            self, prefill_base_s=self.prefill_base_s * prefill_factor,
            prefill_per_token_s=self.prefill_per_token_s * prefill_factor,
            prefill_per_pair_s=self.prefill_per_pair_s * prefill_factor,
            decode_base_s=self.decode_base_s * decode_factor, decode_per_seq_s=self.decode_per_seq_s * decode_factor,
            decode_per_context_token_s=self.decode_per_context_token_s * decode_factor)


class CostTracker:
    """A worker's current cost model: fitted to its calibration samples plus a window of recent real timings,
    refitted every `refit_every` new ones. Subclasses say which half of the model the samples fit (`_fit`)."""

    def __init__(self, calibration: list[Sample], kv_bytes_per_token: int, window: int, refit_every: int):
        if not calibration:
            raise ValueError("no calibration samples")
        self.calibration = list(calibration)
        self.kv_bytes_per_token = kv_bytes_per_token
        self.recent: deque[Sample] = deque(maxlen=window)
        self.refit_every = refit_every
        self._since_refit = 0
        # (max, mean) relative error of the current model on the samples it was fitted to.
        self.error = (0.0, 0.0)
        self.model = self._fit_logged(self.calibration)

    def observe(self, size: int, context: int, seconds: float) -> None:
        """Records one real timing; refits every `refit_every` of them."""
        if size <= 0 or seconds <= 0:
            return
        self.recent.append((size, context, seconds))
        self._since_refit += 1
        if self._since_refit >= self.refit_every:
            self.refit()

    def refit(self) -> CostModel:
        self._since_refit = 0
        self.model = self._fit_logged(self.calibration + list(self.recent), logging.DEBUG)
        return self.model

    def _fit_logged(self, samples: list[Sample], level: int = logging.INFO) -> CostModel:
        model = self._fit(samples)
        self.error = fit_error(samples, lambda size, context: self._predict(model, size, context))
        log.log(level, "%s fit to %d samples: relative error max %.0f%%, mean %.0f%%", type(self).__name__,
                len(samples), self.error[0] * 100, self.error[1] * 100)
        return model

    def _fit(self, samples: list[Sample]) -> CostModel:
        raise NotImplementedError

    @staticmethod
    def _predict(model: CostModel, size: int, context: int) -> float:
        """The model's prediction of one sample's shape."""
        raise NotImplementedError


def fit_error(samples: list[Sample], predict: Callable[[int, int], float]) -> tuple[float, float]:
    """(max, mean) of |predicted / measured - 1| over `samples`."""
    errors = [abs(predict(size, context) / seconds - 1) for size, context, seconds in samples]
    return max(errors), sum(errors) / len(errors)


def fit_prefill(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares (p0, p1, p2) >= 0 from (new tokens, reused tokens, seconds) samples (see the module
    docstring)."""
    coef = _nonnegative_lstsq(_prefill_rows(samples), np.array([t for _, _, t in samples]))
    return float(coef[0]), float(coef[1]), float(coef[2])


def fit_decode(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares (d0, d1, d2) >= 0 from (batch size, context tokens, seconds) samples (see the module
    docstring)."""
    coef = _nonnegative_lstsq(_decode_rows(samples), np.array([t for _, _, t in samples]))
    return float(coef[0]), float(coef[1]), float(coef[2])


def is_prefill_determined(samples: list[Sample]) -> bool:
    """True when the shapes of `samples` determine all three prefill coefficients."""
    return _is_full_rank(_prefill_rows(samples))


def is_decode_determined(samples: list[Sample]) -> bool:
    """True when the shapes of `samples` determine all three decode coefficients."""
    return _is_full_rank(_decode_rows(samples))


def _prefill_rows(samples: list[Sample]) -> np.ndarray:
    return np.array([[1.0, n, n * (r + n / 2)] for n, r, _ in samples]).reshape(-1, 3)


def _decode_rows(samples: list[Sample]) -> np.ndarray:
    return np.array([[1.0, b, c] for b, c, _ in samples], dtype=float).reshape(-1, 3)


def _is_full_rank(a: np.ndarray) -> bool:
    norms = np.linalg.norm(a, axis=0)
    return a.shape[0] >= a.shape[1] and bool((norms > 0).all()) and np.linalg.matrix_rank(a / norms) == a.shape[1]


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients >= 0 minimising the squared relative error of `a @ coef` against `y` (y > 0).

    Exact: the unconstrained solution on every subset of columns the samples determine (at least as many samples
    as columns, columns independent), the best feasible one kept, the smaller subset on a tie; a subset the
    samples do not determine is never solved, so terms no sample tells apart stay at 0.
    """
    if len(y) == 0:
        raise ValueError("no samples to fit")
    # NOTE: rows scaled by 1 / y make the residual relative; columns scaled to unit norm keep the rank test fair
    # between a constant and a quadratic term.
    weighted = a / y[:, None]
    norms = np.linalg.norm(weighted, axis=0)
    norms[norms == 0] = 1.0
    weighted = weighted / norms
    ones = np.ones(len(y))
    best, best_residual = np.zeros(a.shape[1]), np.inf
    for size in range(1, min(a.shape[1], len(y)) + 1):
        for columns in combinations(range(a.shape[1]), size):
            sub = weighted[:, columns]
            if not _is_full_rank(sub):
                continue
            sol, *_ = np.linalg.lstsq(sub, ones, rcond=None)
            if (sol < 0).any():
                continue
            residual = float(np.sum((sub @ sol - ones) ** 2))
            if residual < best_residual - 1e-12:
                best, best_residual = np.zeros(a.shape[1]), residual
                best[list(columns)] = sol
    return best / norms


# Accelerators and models for roofline cost models (the paper's setting: LLaMA3-70B on 8 x A800 per node).
GPUS = {
    # name: (dense bf16 FLOP/s, HBM bytes/s) per GPU
    "a800": (312e12, 2.0e12),
    "h800": (989e12, 3.35e12),
}
MODELS = {
    # name: (parameters, layers, hidden size, KV heads x head dim)
    "llama3-70b": (70.6e9, 80, 8192, 8 * 128),
    "llama3-8b": (8.0e9, 32, 4096, 8 * 128),
}


def roofline(model: str = "llama3-70b", gpu: str = "a800", num_gpus: int = 8, mfu: float = 0.5,
             mbu: float = 0.6) -> CostModel:
    """A cost model from first principles: prefill bound by compute at `mfu` of peak, decode by memory
    bandwidth at `mbu` of peak (bf16 weights and KV)."""
    flops, bandwidth = GPUS[gpu]
    params, layers, hidden, kv_dim = MODELS[model]
    compute = flops * num_gpus * mfu
    memory = bandwidth * num_gpus * mbu
    kv_bytes = 2 * layers * kv_dim * 2  # K and V, bf16
    return CostModel(
        prefill_base_s=0.02, prefill_per_token_s=2 * params / compute,
        prefill_per_pair_s=4 * layers * hidden / compute,  # QK^T and AV: 2 matmuls x 2 FLOPs per pair per layer
        decode_base_s=2 * params / memory, decode_per_seq_s=2 * params / compute,
        decode_per_context_token_s=kv_bytes / memory, kv_bytes_per_token=kv_bytes,
        source=f"roofline:{model}/{num_gpus}x{gpu}")
