"""Loads the served causal LM (torch): the seeded demo model, or a local Llama/Qwen2/Mistral checkpoint."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tsukimi.model.spec import DEMO_CONFIG, DEMO_SEED, SUPPORTED_MODEL_TYPES

log = logging.getLogger(__name__)


def build_demo_model(config: dict | None = None, seed: int = DEMO_SEED) -> LlamaForCausalLM:
    """A Llama causal LM whose weights come from `seed`: the same weights on every machine."""
    fields = {k: v for k, v in (config or DEMO_CONFIG).items() if k not in {"model_type", "architectures", "torch_dtype"}}
    cfg = LlamaConfig(**fields)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.to(torch.float32).eval()


def load_model(model: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model for "demo" or a checkpoint directory, in eval mode on the CPU."""
    if model == "demo":
        return build_demo_model()
    config = AutoConfig.from_pretrained(model, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {config.model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}")
    # NOTE: bfloat16 is slower than float32 for batched decode on these CPUs; float32 unless asked.
    loaded = AutoModelForCausalLM.from_pretrained(
        model, local_files_only=True, dtype=dtype or torch.float32, attn_implementation="sdpa"
    )
    log.info("loaded %s (%s, %.1fM parameters)", os.path.basename(model), config.model_type,
             sum(p.numel() for p in loaded.parameters()) / 1e6)
    return loaded.eval()
