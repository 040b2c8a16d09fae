"""Predicted times of a model instance: the cost model the conductor places requests with, the simulator runs
instances on, and the workers fit from their own measurements and publish in their heartbeats.

Transformer compute is regular, so low-order polynomials predict it well:
- prefill of `new` tokens after `reused` cached ones: `p0 + p1 * new + p2 * new * (reused + new / 2)` (linear
  layers per token; attention per pair of a new token and a token it attends to);
- one decode step of a batch of `batch` sequences holding `context` tokens in all:
  `d0 + d1 * batch + d2 * context` (weights read once per step, per-sequence work, KV read per token).

Pure: no torch; numpy only for fitting.
"""

from __future__ import annotations

from collections import deque

import msgspec
import numpy as np

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

    def prefill_s(self, num_new_tokens: int, num_reused_tokens: int = 0) -> float:
        """Predicted prefill time of `num_new_tokens` after `num_reused_tokens` cached ones."""
        if num_new_tokens <= 0:
            return 0.0
        pairs = num_new_tokens * (num_reused_tokens + num_new_tokens / 2)
        return self.prefill_base_s + self.prefill_per_token_s * num_new_tokens + self.prefill_per_pair_s * pairs

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
        self.model = self._fit(self.calibration)

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
        self.model = self._fit(self.calibration + list(self.recent))
        return self.model

    def _fit(self, samples: list[Sample]) -> CostModel:
        raise NotImplementedError


def fit_prefill(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares (p0, p1, p2) from (new tokens, reused tokens, seconds) samples, clipped at 0."""
    a = np.array([[1.0, n, n * (r + n / 2)] for n, r, _ in samples])
    y = np.array([t for _, _, t in samples])
    coef = _nonnegative_lstsq(a, y)
    return float(coef[0]), float(coef[1]), float(coef[2])


def fit_decode(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares (d0, d1, d2) from (batch size, context tokens, seconds) samples, clipped at 0."""
    a = np.array([[1.0, b, c] for b, c, _ in samples])
    y = np.array([t for _, _, t in samples])
    coef = _nonnegative_lstsq(a, y)
    return float(coef[0]), float(coef[1]), float(coef[2])


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: refits without any column that came out negative."""
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active = [c for c, s in zip(active, sol) if s >= 0] if (sol >= 0).any() else []
    return coef


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
