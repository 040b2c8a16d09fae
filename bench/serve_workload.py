"""What `tsukimi bench serve` sends: a Mooncake-format trace scaled down to the machine, or synthetic Poisson load.

A trace carries no text, only `hash_ids` (one per 512-token block of the prompt; equal ids at the same position
mean the same prefix). Each hash id becomes a block of token ids drawn by a generator seeded by (salt, hash id),
so equal ids give equal blocks, equal leading ids give equal prompt prefixes, and the server's prefix cache is
exercised as the trace says. The salt changes every block at once (a fresh salt: a cold cache for this run).

Scaling: arrival times are divided by the rate scale; input and output lengths and the block size are multiplied
by the length scale (rounded, at least 1 token each).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tsukimi.sim.workload import requests_from_trace

# Tokens per `hash_ids` block in a Mooncake trace.
TRACE_BLOCK_TOKENS = 512
# The demo model's end-of-text id (its byte-level vocabulary: 0..255 are bytes).
DEMO_EOS_ID = 256
# Hash ids of synthetic prompts: the shared prefix, then one per request (clear of small trace-like ids).
SYNTHETIC_PREFIX_ID = 1 << 40
SYNTHETIC_UNIQUE_BASE = (1 << 40) + 1


@dataclass(frozen=True)
class PlannedRequest:
    """One request to send: when (s after the run's start), which token ids, how many tokens to ask for."""

    index: int
    arrival_s: float
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Schedule:
    """The requests of one run, in arrival order, and the span of time they were drawn from (s)."""

    requests: list[PlannedRequest]
    window_s: float

    @property
    def offered_rate(self) -> float | None:
        """Requests per second the schedule offers (None with fewer than two requests and no window)."""
        if not self.requests or self.window_s <= 0:
            return None
        return len(self.requests) / self.window_s


class PromptMaker:
    """Token ids from (hash id, length) blocks; block h's ids are the first n drawn by a generator seeded (salt, h)."""

    def __init__(self, vocab_size: int = 256, avoid_ids: Iterable[int] = (DEMO_EOS_ID,), salt: int = 0):
        avoid = set(avoid_ids)
        self.allowed = np.array([i for i in range(vocab_size) if i not in avoid], dtype=np.int64)
        if not len(self.allowed):
            raise ValueError("no token id left to draw from")
        self.salt = salt
        # hash id -> the longest block drawn for it so far (a shorter block is its prefix).
        self._blocks: dict[int, np.ndarray] = {}

    def block(self, hash_id: int, n: int) -> np.ndarray:
        """The block of `n` ids of `hash_id` (a block of m < n ids of the same hash id is its prefix)."""
        cached = self._blocks.get(hash_id)
        if cached is None or len(cached) < n:
            rng = np.random.default_rng([self.salt, hash_id])
            cached = self.allowed[rng.integers(0, len(self.allowed), size=n)]
            self._blocks[hash_id] = cached
        return cached[:n]

    def prompt(self, blocks: Iterable[tuple[int, int]]) -> list[int]:
        """Token ids of consecutive (hash id, length) blocks."""
        parts = [self.block(h, n) for h, n in blocks if n > 0]
        return np.concatenate(parts).tolist() if parts else []


def scale_length(n: int, scale: float) -> int:
    """`n` tokens times `scale`, rounded half up, at least 1."""
    return max(1, math.floor(n * scale + 0.5))


def trace_blocks(hash_ids: Sequence[int], block_tokens: int, num_tokens: int) -> list[tuple[int, int]]:
    """(hash id, length) blocks covering `num_tokens`: full blocks in order, the last id taking whatever is left
    (fewer or more than a block: scaled lengths do not divide evenly)."""
    out = []
    left = num_tokens
    for i, h in enumerate(hash_ids):
        if left <= 0:
            break
        n = left if i == len(hash_ids) - 1 else min(block_tokens, left)
        out.append((int(h), n))
        left -= n
    return out


def trace_schedule(trace: list[dict], maker: PromptMaker, *, rate_scale: float = 1.0, length_scale: float = 0.02,
                   output_scale: float | None = None, limit: int | None = None, duration_s: float | None = None
                   ) -> Schedule:
    """The trace's requests (arrival order, the first at 0) scaled; only those arriving before `duration_s` of
    replay time (after rate scaling) when given. Output lengths scale by `output_scale` (default: `length_scale`)."""
    output_scale = length_scale if output_scale is None else output_scale
    if length_scale <= 0 or output_scale <= 0:
        raise ValueError("length scales must be positive")
    requests = requests_from_trace(trace, rate_scale, limit)
    block_tokens = scale_length(TRACE_BLOCK_TOKENS, length_scale)
    start = requests[0].arrival if requests else 0.0
    planned = []
    cut = False
    for r in requests:
        at = r.arrival - start
        if duration_s is not None and at >= duration_s:
            cut = True
            break
        n_in = scale_length(r.num_prompt_tokens, length_scale)
        # NOTE: a trace row without hash ids still needs a prompt: a block of its own.
        keys = r.keys or (SYNTHETIC_UNIQUE_BASE + (1 << 32) + r.index,)
        prompt = maker.prompt(trace_blocks(keys, block_tokens, n_in))
        planned.append(PlannedRequest(len(planned), at, prompt, scale_length(r.num_output_tokens, output_scale)))
    return Schedule(planned, _window(planned, duration_s if cut else None))


def _window(planned: list[PlannedRequest], cut_at: float | None) -> float:
    """The span the arrivals were drawn from: the cut when there was one, else up to the last arrival plus one
    mean gap (n arrivals over that span: the rate they were drawn at)."""
    if cut_at is not None:
        return cut_at
    if len(planned) < 2:
        return 0.0
    last = planned[-1].arrival_s
    return last * len(planned) / (len(planned) - 1)


def synthetic_lengths(rng: np.random.Generator, mean: int, range_ratio: float) -> int:
    """A length uniform in [mean x (1 - r), mean x (1 + r)] (r = 0: exactly `mean`), at least 1."""
    if range_ratio <= 0:
        return max(1, mean)
    low = max(1, math.floor(mean * (1 - range_ratio) + 0.5))
    high = max(low, math.floor(mean * (1 + range_ratio) + 0.5))
    return int(rng.integers(low, high + 1))


def synthetic_schedule(maker: PromptMaker, *, rate: float, input_len: int = 300, output_len: int = 8,
                       range_ratio: float = 0.0, prefix_ratio: float = 0.0, limit: int | None = None,
                       duration_s: float | None = 60.0, seed: int = 0) -> Schedule:
    """Poisson arrivals at `rate` req/s (the first at 0) until `limit` requests or `duration_s` seconds.

    Every prompt starts with the same `prefix_ratio x input_len` tokens (capped at its own length); the rest is
    its own. Lengths are fixed, or uniform within +-`range_ratio` of the given ones.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if limit is None and duration_s is None:
        raise ValueError("a synthetic run needs a limit or a duration")
    if not 0 <= prefix_ratio <= 1:
        raise ValueError("prefix ratio must be within [0, 1]")
    rng = np.random.default_rng(seed)
    shared = math.floor(prefix_ratio * input_len + 0.5)
    planned = []
    at = 0.0
    while limit is None or len(planned) < limit:
        if duration_s is not None and at >= duration_s:
            break
        n_in = synthetic_lengths(rng, input_len, range_ratio)
        n_out = synthetic_lengths(rng, output_len, range_ratio)
        head = min(shared, n_in)
        prompt = maker.prompt([(SYNTHETIC_PREFIX_ID, head), (SYNTHETIC_UNIQUE_BASE + len(planned), n_in - head)])
        planned.append(PlannedRequest(len(planned), at, prompt, n_out))
        at += float(rng.exponential(1.0 / rate))
    is_cut = duration_s is not None and (limit is None or len(planned) < limit)
    return Schedule(planned, duration_s if is_cut else _window(planned, None))
