"""The decode worker's own cost model: measured at start-up, corrected online from real batch steps.

`calibrate` runs decode steps of batches of random KV: first three configurations that determine all three
coefficients (one short sequence, the largest batch of short ones, the largest batch over the most context the
engine's KV arena holds), whatever the time budget, each timed fewer times when slow; then, while the budget
allows (the first fit predicts what each costs), more batch sizes and context lengths. `DecodeCosts` fits
`CostModel`'s decode coefficients to those samples plus a window of the latest real steps
(`DecodeEngine.last_step`), refitting every few steps, so the published model follows the machine's actual speed.
"""

from __future__ import annotations

import logging
import time

import torch

from tsukimi.common.cost_model import CostModel, CostTracker, Sample, fit_decode, is_decode_determined
from tsukimi.common.messages import SamplingParams
from tsukimi.decode.engine import DecodeEngine
from tsukimi.decode.kv_blocks import KVBlocks
from tsukimi.model.kv import KVLayout, block_layout

log = logging.getLogger("tsukimi.decode")

# Context tokens per sequence of the short configurations.
SHORT_CONTEXT = 64
# Most context tokens (all sequences of a batch) timed, below what the engine's KV arena holds.
MAX_CONTEXT_TOKENS = 32768
# Most bytes of scratch KV a configuration may allocate (the context span shrinks to fit).
MAX_SCRATCH_BYTES = 512 << 20
# Seconds calibration may take for the extra configurations (the three that determine the model always run).
BUDGET_S = 2.5
# Seconds the three may take at most: a longer context is shrunk (halved) until its predicted time fits.
MAX_S = 30.0
# Timed steps per configuration, after one untimed step (the join and first-call allocations): 1 when slow.
STEPS = 3
SLOW_STEP_S = 0.1


def calibrate(engine: DecodeEngine, budget_s: float = BUDGET_S, seed: int = 0) -> list[Sample]:
    """(batch size, context tokens, seconds) samples of decode steps: the median of a few steps per configuration.

    Runs on scratch engines sharing `engine`'s model (its own batch is untouched). Batch sizes are capped by its
    `max_batch_size`, contexts by its `max_model_len` and its KV arena; the three configurations that determine the
    model come first and always run, the extra ones only while `budget_s` allows.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    max_context = engine.max_model_len - STEPS - 2
    span = _context_span(engine)
    samples: list[Sample] = []
    timed: set[tuple[int, int]] = set()
    for batch, context in _determining_configs(engine.max_batch_size, max_context, span):
        if samples:
            context = _shrunk(batch, context, samples[-1], MAX_S - (time.perf_counter() - started))
        samples.append(time_steps(engine.model, engine.kv.block, batch, context, generator))
        timed.add((batch, context))
    d0, d1, d2 = fit_decode(samples)
    model = CostModel(decode_base_s=d0, decode_per_seq_s=d1, decode_per_context_token_s=d2)
    for batch, context in _extra_configs(engine.max_batch_size, max_context, span):
        if (batch, context) in timed or time.perf_counter() - started + (STEPS + 1) * model.decode_step_s(
                batch, batch * context) > budget_s:
            continue
        samples.append(time_steps(engine.model, engine.kv.block, batch, context, generator))
        timed.add((batch, context))
    log.info("decode calibrated in %.2fs: %s", time.perf_counter() - started,
             ", ".join(f"{b}x{c // b}:{t * 1000:.0f}ms" for b, c, t in samples))
    if not is_decode_determined(samples):
        log.warning("decode calibration: a batch of %d and %d tokens of context leave too few configurations for "
                    "every coefficient; the terms they do not tell apart stay at 0", engine.max_batch_size, span)
    return samples


def time_steps(model: torch.nn.Module, block: KVLayout, batch: int, context: int,
               generator: torch.Generator | None = None) -> Sample:
    """(batch, context tokens at the step, seconds): the median of STEPS steps (1 when slow) of `batch` sequences
    of `context` tokens of random KV each, after an untimed one."""
    dtype = next(model.parameters()).dtype
    blocks_per_seq = -(-(context + STEPS + 2) // block.seq_len)
    scratch = DecodeEngine(model, batch, context + STEPS + 3, KVBlocks(block, batch * blocks_per_seq))
    # NOTE: one random KV per layer serves every sequence: a step's time does not depend on the values.
    kv = [(torch.randn(1, block.num_kv_heads, context, block.head_dim, generator=generator, dtype=dtype),
           torch.randn(1, block.num_kv_heads, context, block.head_dim, generator=generator, dtype=dtype))
          for _ in range(block.num_layers)]
    sampling = SamplingParams(temperature=0.0, max_tokens=1 << 30)
    scratch.step([scratch.sequence_with_kv(f"calibration-{i}", sampling, kv, 0) for i in range(batch)], set())
    num_steps = STEPS if scratch.last_step[2] < SLOW_STEP_S else 1
    steps = []
    for _ in range(num_steps):
        scratch.step([], set())
        steps.append(scratch.last_step)
    steps.sort(key=lambda s: s[2])
    return steps[len(steps) // 2]


def _context_span(engine: DecodeEngine) -> int:
    """Most batch context tokens to time: what the arena holds, within MAX_CONTEXT_TOKENS and MAX_SCRATCH_BYTES."""
    arena = engine.kv.num_blocks * engine.kv.block_tokens
    scratch = MAX_SCRATCH_BYTES * engine.kv.block_tokens // engine.kv.block_bytes
    return max(1, min(arena, MAX_CONTEXT_TOKENS, scratch, engine.max_batch_size * engine.max_model_len))


def _determining_configs(max_batch_size: int, max_context: int, span: int) -> list[tuple[int, int]]:
    """(batch, context per sequence) of three configurations that determine the model: one short sequence, the
    largest batch of short ones, the largest batch over the context span (one sequence over as much as it takes
    when the span gives the batch no more than short sequences); fewer when the limits leave no room."""
    short = max(1, min(SHORT_CONTEXT, max_context, span))
    batch = max(1, min(max_batch_size, span // short))
    configs = [(1, short), (batch, short)]
    if span // batch >= 2 * short:
        configs.append((batch, min(max_context, span // batch)))
    else:
        configs.append((1, min(max_context, span)))
    return list(dict.fromkeys(configs))


def _extra_configs(max_batch_size: int, max_context: int, span: int) -> list[tuple[int, int]]:
    """More (batch, context per sequence) within the same limits, most useful first: long contexts (what TBT
    refusals judge), then smaller batches."""
    short = max(1, min(SHORT_CONTEXT, max_context, span))
    batch = max(1, min(max_batch_size, span // short))
    quarter, half = max(1, batch // 4), max(1, batch // 2)
    configs = [(half, min(max_context, span // half)), (1, min(max_context, span)),
               (quarter, min(max_context, span // (2 * quarter))), (quarter, short), (half, short)]
    return list(dict.fromkeys(c for c in configs if c[1] >= 1))


def _shrunk(batch: int, context: int, last: Sample, remaining_s: float) -> int:
    """`context` per sequence, halved while its steps (each predicted at most linear in the batch's size from the
    last sample) would exceed `remaining_s`, but not below twice SHORT_CONTEXT."""
    last_batch, last_context, last_s = last
    while context > 2 * SHORT_CONTEXT:
        step_s = last_s * max(batch / last_batch, batch * context / max(1, last_context))
        if step_s * (1 + (STEPS if step_s < SLOW_STEP_S else 1)) <= remaining_s:
            break
        context //= 2
    return context


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
                         kv_bytes_per_token=self.kv_bytes_per_token, source="measured",
                         decode_max_batch_size=max(b for b, _, _ in samples),
                         decode_max_context_tokens=max(c for _, c, _ in samples))

    @staticmethod
    def _predict(model: CostModel, size: int, context: int) -> float:
        return model.decode_step_s(size, context)


def measure(engine: DecodeEngine, budget_s: float = BUDGET_S) -> DecodeCosts:
    """Calibrates `engine`'s model and returns the cost tracker to publish and correct online."""
    costs = DecodeCosts(calibrate(engine, budget_s), kv_bytes_per_token(engine.model))
    m = costs.model
    log.info("decode cost model: %.2fms + %.3fms/sequence + %.3fus/context token up to %d x %d tokens (error on "
             "its samples: max %.0f%%, mean %.0f%%)", m.decode_base_s * 1e3, m.decode_per_seq_s * 1e3,
             m.decode_per_context_token_s * 1e6, m.decode_max_batch_size, m.decode_max_context_tokens,
             costs.error[0] * 100, costs.error[1] * 100)
    return costs
