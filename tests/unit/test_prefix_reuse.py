"""Prefill from a reused prefix KV: token-identical to transformers' greedy generate, down to a hit that
covers all but the last token; KV blocks split and joined back exactly."""

import pytest
import torch

from tsukimi.common.messages import KVLayout
from tsukimi.model.kv import join_blocks, layout_of, split_blocks
from tsukimi.model.loader import build_demo_model
from tsukimi.prefill.engine import PrefillEngine

from tests.unit.tiny_model import TINY, greedy, reference

BLOCK = 4


@pytest.fixture(scope="module")
def model():
    return build_demo_model(TINY, seed=3)


@pytest.mark.parametrize("num_prefix_blocks", [0, 1, 3, 4])
def test_prefix_hits_are_token_identical(model, num_prefix_blocks):
    prompt = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 1, 3, 2, 9, 7, 5, 11]  # 17 tokens: 4 full blocks + 1
    prefill = PrefillEngine(model)
    full = prefill.run(prompt[:num_prefix_blocks * BLOCK] + [0]) if num_prefix_blocks else None
    prefix = None
    if num_prefix_blocks:
        # Store the prefix as pool blocks, then load them back: split, pack, join.
        kv = [(k[:, :, :num_prefix_blocks * BLOCK], v[:, :, :num_prefix_blocks * BLOCK]) for k, v in full.kv]
        blocks = split_blocks(kv, BLOCK)
        assert len(blocks) == num_prefix_blocks
        layout = KVLayout(2, 2, BLOCK, 16, "float32")
        prefix = join_blocks(layout, [bytearray(b.numpy().tobytes()) for b in blocks])
        for (k, v), (k2, v2) in zip(kv, prefix):
            assert torch.equal(k, k2) and torch.equal(v, v2)
    # 16 of 17 tokens reused when num_prefix_blocks == 4: only the last token is computed.
    assert greedy(model, prefill, prompt, 12, prefix) == reference(model, prompt, 12)


def test_prefix_must_leave_a_token_to_compute(model):
    prefill = PrefillEngine(model)
    kv = prefill.run(list(range(8))).kv
    with pytest.raises(ValueError, match="nothing to compute"):
        prefill.run(list(range(8)), kv)
    assert layout_of(kv).seq_len == 8
