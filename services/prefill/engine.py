"""Runs a prompt through the model once: its KV cache and the logits of the next token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class PrefillResult:
    """What one prefill produces."""

    # Logits of the token after the prompt, shape [vocab].
    logits: torch.Tensor
    # Per layer (K, V), each [1, kv_heads, prompt_len, head_dim].
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class PrefillEngine:
    """Computes prompts' KV caches with a Hugging Face causal LM."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.inference_mode()
    def run(self, prompt_token_ids: list[int]) -> PrefillResult:
        """Prefills one prompt."""
        input_ids = torch.tensor([prompt_token_ids], dtype=torch.long)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return PrefillResult(logits=out.logits[0, -1].float(), kv=kv)
