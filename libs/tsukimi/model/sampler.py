"""Picks the next token of each request from its logits, with its own settings.

Randomness is a pure function of (request seed, output index): the same request samples the same tokens
whichever worker computes a position, so prefill (index 0) and decode (the rest) need no shared state.
"""

from __future__ import annotations

import torch

from tsukimi.common.messages import SamplingParams

_MIX = 0x9E3779B97F4A7C15


def _generator(seed: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(((seed & 0xFFFFFFFFFFFF) * 1_000_003 + index * _MIX) & 0x7FFFFFFFFFFFFFFF)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Token for output position `index` from one row of logits (shape [vocab])."""
    if params.temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = cumulative - sorted_probs < params.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=_generator(params.seed, index)).item())


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """Tokens for a batch: row i of `logits` ([batch, vocab]) with params[i] at output position indices[i]."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [
        greedy[i] if p.temperature <= 0 else sample(logits[i], p, indices[i])
        for i, p in enumerate(params)
    ]
