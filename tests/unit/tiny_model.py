"""A tiny seeded model and the two ways of running it greedily that model tests compare: tsukimi's engines
(prefill, then the decode batch) and transformers' own `generate`."""

import torch

from tsukimi.common.messages import SamplingParams
from tsukimi.decode.engine import DecodeEngine
from tsukimi.decode.kv_blocks import KVBlocks
from tsukimi.prefill.engine import PrefillEngine

TINY = {"vocab_size": 257, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "eos_token_id": 256,
        "initializer_range": 0.2}


def decode_engine(model, prefill: PrefillEngine, max_batch_size: int = 8, max_model_len: int = 256,
                  num_blocks: int = 64, block_tokens: int = 4) -> DecodeEngine:
    """A paged decode engine over `model` with small blocks (so sequences cross block boundaries)."""
    return DecodeEngine(model, max_batch_size, max_model_len, KVBlocks(prefill.block_layout(block_tokens), num_blocks))


def greedy(model, prefill: PrefillEngine, prompt, n, prefix_kv=None):
    """`n` greedy tokens through `prefill` (optionally from a reused prefix KV) and the paged decode engine."""
    result = prefill.run(prompt, prefix_kv)
    token = int(result.logits.argmax())
    engine = decode_engine(model, prefill)
    out = [token]
    arrived = [engine.sequence_with_kv("r", SamplingParams(max_tokens=n, temperature=0.0), result.kv, token)]
    while len(out) < n:
        events, _ = engine.step(arrived, set())
        arrived = []
        out += [e.token_id for e in events]
    return out


def reference(model, prompt, n):
    """`n` tokens of transformers' greedy `generate`."""
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
