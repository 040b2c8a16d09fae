"""The decode worker's own cost model: measured at start-up, corrected online from real batch steps.

`calibrate` runs decode steps of batches of random KV (a few batch sizes and context lengths) within a time
budget; `DecodeCosts` fits `CostModel`'s decode coefficients to those samples plus a window of the latest real
steps (`DecodeEngine.last_step`), refitting every few steps, so the published model follows the machine's actual
speed.
"""

from __future__ import annotations

import logging
import time

import torch

from tsukimi.common.cost_model import CostModel, CostTracker, Sample, fit_decode
from tsukimi.common.messages import SamplingParams
from tsukimi.decode.engine import DecodeEngine
from tsukimi.decode.kv_blocks import KVBlocks
from tsukimi.model.kv import block_layout

log = logging.getLogger("tsukimi.decode")

# (batch size, context tokens per sequence) timed at start-up, cheapest first.
CONFIGS = ((1, 64), (4, 64), (1, 512), (16, 64), (4, 512), (16, 512))
# Seconds calibration may take (checked before each configuration, from the cost of the previous one).
BUDGET_S = 2.5
# Timed steps per configuration, after one untimed step (the join and first-call allocations).
STEPS = 3


def calibrate(engine: DecodeEngine, budget_s: float = BUDGET_S, seed: int = 0) -> list[Sample]:
    """(batch size, context tokens, seconds) samples of decode steps: the median of a few steps per configuration.

    Runs on scratch engines sharing `engine`'s model (its own batch is untouched). Batch sizes are capped by its
    `max_batch_size`, contexts by its `max_model_len`; configurations are skipped once the budget would be exceeded,
    but the first one is always measured.
    """
    model = engine.model
    block = engine.kv.block
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    samples: list[Sample] = []
    last_size, last_s = 0, 0.0
    for batch, context in _configs(engine.max_batch_size, engine.max_model_len - STEPS - 2):
        estimate = last_s * batch * context / last_size if last_size else 0.0
        if samples and time.perf_counter() - started + estimate > budget_s:
            break
        config_started = time.perf_counter()
        blocks_per_seq = -(-(context + STEPS + 2) // block.seq_len)
        scratch = DecodeEngine(model, batch, engine.max_model_len, KVBlocks(block, batch * blocks_per_seq))
        sequences = [scratch.sequence_with_kv(
            f"calibration-{i}", SamplingParams(temperature=0.0, max_tokens=1 << 30),
            [(torch.randn(1, block.num_kv_heads, context, block.head_dim, generator=generator, dtype=dtype),
              torch.randn(1, block.num_kv_heads, context, block.head_dim, generator=generator, dtype=dtype))
             for _ in range(block.num_layers)], 0) for i in range(batch)]
        scratch.step(sequences, set())
        steps = []
        for _ in range(STEPS):
            scratch.step([], set())
            steps.append(scratch.last_step)
        steps.sort(key=lambda s: s[2])
        samples.append(steps[len(steps) // 2])
        del scratch, sequences
        last_size, last_s = batch * context, time.perf_counter() - config_started
    log.info("decode calibrated in %.2fs: %s", time.perf_counter() - started,
             ", ".join(f"{b}x{c // b}:{t * 1000:.0f}ms" for b, c, t in samples))
    return samples


def _configs(max_batch_size: int, max_context: int) -> list[tuple[int, int]]:
    """CONFIGS fitted under the engine's limits, without duplicates."""
    configs: list[tuple[int, int]] = []
    for batch, context in CONFIGS:
        config = (min(batch, max_batch_size), max(1, min(context, max_context)))
        if config not in configs:
            configs.append(config)
    return configs


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of KV (K and V of every layer) one token of this model takes."""
    return block_layout(model, 1).num_bytes


class DecodeCosts(CostTracker):
    """The current decode cost model: calibration samples plus a window of recent real steps."""

    def __init__(self, calibration: list[Sample], kv_bytes_per_token: int, window: int = 256,
                 refit_every: int = 32):
        super().__init__(calibration, kv_bytes_per_token, window, refit_every)

    def _fit(self, samples: list[Sample]) -> CostModel:
        d0, d1, d2 = fit_decode(samples)
        return CostModel(decode_base_s=d0, decode_per_seq_s=d1, decode_per_context_token_s=d2,
                         kv_bytes_per_token=self.kv_bytes_per_token, source="measured")


def measure(engine: DecodeEngine, budget_s: float = BUDGET_S) -> DecodeCosts:
    """Calibrates `engine`'s model and returns the cost tracker to publish and correct online."""
    costs = DecodeCosts(calibrate(engine, budget_s), kv_bytes_per_token(engine.model))
    m = costs.model
    log.info("decode cost model: %.2fms + %.3fms/sequence + %.3fus/context token", m.decode_base_s * 1e3,
             m.decode_per_seq_s * 1e3, m.decode_per_context_token_s * 1e6)
    return costs
