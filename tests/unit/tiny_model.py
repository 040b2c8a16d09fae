"""A tiny seeded model and the two ways of running it greedily that model tests compare: tsukimi's engines
(prefill, then the decode batch) and transformers' own `generate`."""

import torch

from tsukimi.decode.batch import DecodeBatch, Row
from tsukimi.prefill.engine import PrefillEngine

TINY = {"vocab_size": 257, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "eos_token_id": 256,
        "initializer_range": 0.2}


def greedy(model, prefill: PrefillEngine, prompt, n, prefix_kv=None):
    """`n` greedy tokens through `prefill` (optionally from a reused prefix KV) and a one-row decode batch."""
    result = prefill.run(prompt, prefix_kv)
    token = int(result.logits.argmax())
    batch = DecodeBatch(model)
    batch.add([Row("r", len(prompt), token)], [result.kv])
    out = [token]
    for _ in range(n - 1):
        token = int(batch.step()[0].argmax())
        batch.rows[0].next_token_id = token
        out.append(token)
    return out


def reference(model, prompt, n):
    """`n` tokens of transformers' greedy `generate`."""
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
