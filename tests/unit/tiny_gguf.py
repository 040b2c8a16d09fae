"""Writes a tiny seeded Qwen2 model as a GGUF file, as llama.cpp's converter lays one out: float32 tensors under
GGUF names, the hyperparameters, and a byte-level BPE tokenizer with ChatML special tokens and template."""

from __future__ import annotations

import gguf
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tsukimi.text.tokenizer import _bytes_to_unicode

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Byte tokens, one merge, then the special tokens.
TOKENS = [*_bytes_to_unicode().values(), "Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IM_END = TOKENS.index("<|im_end|>")
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def tiny_qwen2(seed: int = 5) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, eos_token_id=IM_END, bos_token_id=None, initializer_range=0.2,
        use_sliding_window=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def write_tiny_gguf(path: str, model: Qwen2ForCausalLM) -> None:
    """`model` (from `tiny_qwen2`) as a GGUF file at `path`."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch="qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(TOKENS) - 3) + [gguf.TokenType.CONTROL] * 3)
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(IM_END)
    writer.add_bos_token_id(TOKENS.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_TENSORS.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}", state[f"model.layers.{layer}.{hf_name}"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
