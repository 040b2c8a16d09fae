"""Runs a prompt through the model once: its KV cache and the logits of the next token."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from tsukimi.common.messages import KVLayout
from tsukimi.model.kv import dtype_name


@dataclass
class PrefillResult:
    """What one prefill produces."""

    # Logits of the token after the prompt, shape [vocab].
    logits: torch.Tensor
    # Per layer (K, V), each [1, kv_heads, prompt_len, head_dim].
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class PrefillEngine:
    """Computes prompts' KV caches with a Hugging Face causal LM."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 0,
                 compute: Callable[[], AbstractContextManager] = nullcontext):
        self.model = model
        # Prompt tokens per forward (chunked prefill); 0: the whole prompt in one forward.
        self.chunk_tokens = chunk_tokens
        # Context every forward runs in (the colocated worker's device lock); the lock is let go between chunks.
        self.compute = compute

    def block_layout(self, block_tokens: int) -> KVLayout:
        """Shape of one cache block of this model's KV."""
        config = self.model.config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return KVLayout(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                        block_tokens, head_dim, dtype_name(next(self.model.parameters()).dtype))

    @torch.inference_mode()
    def run(self, prompt_token_ids: list[int], prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
            ) -> PrefillResult:
        """Prefills one prompt. With `prefix_kv` (the KV of the prompt's first tokens, e.g. loaded from the
        cache pool) only the remaining tokens are computed; at least the last token always is."""
        num_prefix = prefix_kv[0][0].shape[2] if prefix_kv else 0
        if num_prefix >= len(prompt_token_ids):
            raise ValueError(f"prefix of {num_prefix} tokens leaves nothing to compute of {len(prompt_token_ids)}")
        cache = DynamicCache(ddp_cache_data=prefix_kv, config=self.model.config) if prefix_kv else DynamicCache(
            config=self.model.config)
        rest = prompt_token_ids[num_prefix:]
        step = self.chunk_tokens or len(rest)
        for start in range(0, len(rest), step):
            input_ids = torch.tensor([rest[start:start + step]], dtype=torch.long)
            with self.compute():
                out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return PrefillResult(logits=out.logits[0, -1].float(), kv=kv)
