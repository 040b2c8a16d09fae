"""What a served model is, readable without torch: the demo model's config, a checkpoint's limits."""

from __future__ import annotations

import json
import os

# The demo model: a Llama-architecture causal LM over the byte-level demo tokenizer, with weights drawn from
# DEMO_SEED. ~22M parameters: small enough for 2 CPU cores, big enough to exercise every path.
DEMO_CONFIG: dict = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 257,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "eos_token_id": 256,
    "bos_token_id": None,
    "pad_token_id": None,
    # NOTE: a wider init than the usual 0.02 spreads the logits, so greedy argmax is not decided by
    # float rounding noise between batched and unbatched execution.
    "initializer_range": 0.1,
    "torch_dtype": "float32",
}
DEMO_SEED = 20250224

SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "mistral"}


def read_model_config(model: str) -> dict:
    """The model's config.json as a dict (the demo config for "demo")."""
    if model == "demo":
        return dict(DEMO_CONFIG)
    path = os.path.join(model, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model} has no config.json")
    with open(path) as f:
        return json.load(f)


def max_model_len(model: str) -> int:
    """Longest prompt + output the model takes."""
    return int(read_model_config(model).get("max_position_embeddings", 2048))
