"""Builds small Hugging Face checkpoints for the tests: real architectures, seeded weights, demo tokenizer."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tsukimi.text.tokenizer import save_demo_tokenizer

# A chat template in the style of Qwen's (ChatML), so the checkpoint path exercises a real template.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_checkpoint(directory: str, seed: int = 11) -> None:
    """A Qwen2-architecture model shaped unlike the demo (6 layers, hidden 384, 6 heads, 3 KV heads, tied
    embeddings), saved with `save_pretrained`, plus the byte-level tokenizer and a ChatML template."""
    config = Qwen2Config(
        vocab_size=257, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=256,
        bos_token_id=None, pad_token_id=None, initializer_range=0.1, use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(directory)
    save_demo_tokenizer(directory, chat_template=CHATML)
