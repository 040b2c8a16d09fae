"""The cache object of one prefill forward over several prompts' chunks packed into one row: each layer's new K
and V are split by prompt and appended to that prompt's own cache, and attention gets every prompt's whole K, V
side by side; the 4D mask lets each prompt's tokens see only its own earlier tokens. Duck-typed to what
transformers' attention layers call on a cache (`update`)."""

from __future__ import annotations

import torch
from transformers import DynamicCache


class PackedCache:
    """Several prompts' caches seen by one forward as one packed sequence."""

    def __init__(self, caches: list[DynamicCache], num_new_tokens: list[int]):
        self.caches = caches
        # Tokens each prompt feeds in this forward, in packing order.
        self.num_new_tokens = num_new_tokens
        past = [cache.get_seq_length() for cache in caches]
        self.num_past_tokens = sum(past)
        # [1, packed tokens]: each token's position in its own prompt.
        self.position_ids = torch.cat([torch.arange(p, p + n) for p, n in zip(past, num_new_tokens)])[None]
        num_q = sum(num_new_tokens)
        mask = torch.zeros(num_q, self.num_past_tokens + num_q, dtype=torch.bool)
        q = k = 0
        for p, n in zip(past, num_new_tokens):
            mask[q:q + n, k:k + p] = True
            mask[q:q + n, k + p:k + p + n] = torch.ones(n, n, dtype=torch.bool).tril()
            q, k = q + n, k + p + n
        # [1, 1, packed tokens, every prompt's past + new tokens]: True where a token may attend.
        self.mask = mask[None, None]
        # Index of each prompt's last fed token in the packed row (whose logits are kept).
        self.last_indices = torch.tensor(num_new_tokens).cumsum(0) - 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends each prompt's slice of the new K, V ([1, heads, packed tokens, dim]) to its own cache and
        returns the prompts' whole K, V concatenated in packing order."""
        keys, values = [], []
        for cache, k, v in zip(self.caches, key_states.split(self.num_new_tokens, dim=2),
                               value_states.split(self.num_new_tokens, dim=2)):
            # NOTE: contiguous copies, so a prompt's cache does not keep the whole packed tensor alive.
            k, v = cache.update(k.contiguous(), v.contiguous(), layer_idx)
            keys.append(k)
            values.append(v)
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_past_tokens
