"""KV packing and sampling: torch, no bus."""

import pytest
import torch

from tsukimi.common.messages import SamplingParams
from tsukimi.model.kv import from_blocks, layout_of, pack, split_blocks, to_blocks, unpack
from tsukimi.model.sampler import sample, sample_batch


def test_pack_unpack_roundtrip():
    layers = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for _ in range(3)]
    layout, flat = pack(layers)
    assert (layout.num_layers, layout.num_kv_heads, layout.seq_len, layout.head_dim) == (3, 2, 5, 4)
    assert flat.numel() == layout.num_bytes == 3 * 2 * 2 * 5 * 4 * 4
    back = unpack(layout, bytearray(flat.numpy().tobytes()))
    for (k, v), (k2, v2) in zip(layers, back):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ValueError):
        unpack(layout, bytearray(10))


def test_same_seed_and_index_same_token_and_greedy_is_argmax():
    logits = torch.randn(257)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    assert sample(logits, params, 3) == sample(logits, params, 3)
    draws = {sample(logits, params, i) for i in range(50)}
    assert len(draws) > 1
    assert sample(logits, SamplingParams(temperature=0), 0) == int(logits.argmax())


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([10.0, 9.0, -10.0, -10.0])
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=1)
    assert {sample(logits, params, i) for i in range(100)} == {0}


def test_batch_sampling_uses_each_rows_settings():
    logits = torch.randn(3, 257)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0)]
    out = sample_batch(logits, params, [0, 4, 0])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())
    assert out[1] == sample(logits[1], params[1], 4)


def test_layout_of_reports_dtype():
    layers = [(torch.zeros(1, 1, 2, 3, dtype=torch.bfloat16),) * 2]
    assert layout_of(layers).dtype == "bfloat16" and layout_of(layers).element_size == 2


def test_blocks_round_trip_and_match_the_pools_block_packing():
    layers = [(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)) for _ in range(3)]
    blocks = to_blocks(layers, 4)
    assert blocks.shape == (3, 3, 2, 2, 4, 4)
    # Full blocks are byte-identical to what the pool stores; the last one is zero-padded.
    for i, packed in enumerate(split_blocks(layers, 4)):
        assert torch.equal(blocks[i].reshape(-1).view(torch.uint8), packed)
    assert torch.count_nonzero(blocks[2, :, :, :, 2:]) == 0
    for (k, v), (k2, v2) in zip(layers, from_blocks(blocks, 10)):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    # One layer at a time fills the same bytes.
    out = torch.zeros_like(blocks)
    for i in range(3):
        to_blocks(layers, 4, out=out, only_layer=i)
    assert torch.equal(out, blocks)
