"""A request's KV cache as one flat byte buffer, the unit the data plane moves from prefill to decode.

Layout: for each layer, K then V, each [num_kv_heads, seq_len, head_dim] contiguous in the model's dtype.
"""

from __future__ import annotations

import torch

from tsukimi.common.messages import KVLayout

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a KVLayout dtype name."""
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The KVLayout name of a torch dtype."""
    return next(name for name, t in _DTYPES.items() if t == dtype)


def block_layout(model: torch.nn.Module, block_tokens: int) -> KVLayout:
    """Shape of one cache block of `model`'s KV."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVLayout(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                    block_tokens, head_dim, dtype_name(next(model.parameters()).dtype))


def layout_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> KVLayout:
    """Layout of per-layer (K, V) tensors of shape [1, heads, seq, dim]."""
    k = layers[0][0]
    return KVLayout(len(layers), k.shape[1], k.shape[2], k.shape[3], dtype_name(k.dtype))


def pack(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[KVLayout, torch.Tensor]:
    """One contiguous uint8 tensor holding every layer's K and V."""
    layout = layout_of(layers)
    flat = torch.cat([t[0].reshape(-1) for kv in layers for t in kv])
    return layout, flat.view(torch.uint8)


def split_blocks(layers: list[tuple[torch.Tensor, torch.Tensor]], block_size: int) -> list[torch.Tensor]:
    """One packed uint8 buffer per full block of `block_size` tokens (the unit the cache pool stores)."""
    seq_len = layers[0][0].shape[2]
    blocks = []
    for start in range(0, seq_len - block_size + 1, block_size):
        part = [(k[:, :, start:start + block_size], v[:, :, start:start + block_size]) for k, v in layers]
        blocks.append(pack([(k.contiguous(), v.contiguous()) for k, v in part])[1])
    return blocks


def join_blocks(layout: KVLayout, blocks: list[torch.Tensor | bytearray | memoryview]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) of the concatenation of `blocks`, each packed with `layout` (one block's shape)."""
    parts = [unpack(layout, b) for b in blocks]
    return [(torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2))
            for i in range(layout.num_layers)]


def unpack(layout: KVLayout, buffer: torch.Tensor | bytearray | memoryview) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) views of shape [1, heads, seq, dim] over `buffer` (no copy)."""
    if not isinstance(buffer, torch.Tensor):
        buffer = torch.frombuffer(buffer, dtype=torch.uint8)
    if buffer.numel() != layout.num_bytes:
        raise ValueError(f"KV buffer has {buffer.numel()} bytes, layout needs {layout.num_bytes}")
    values = buffer.view(_DTYPES[layout.dtype]).view(
        layout.num_layers, 2, 1, layout.num_kv_heads, layout.seq_len, layout.head_dim
    )
    return [(values[i, 0], values[i, 1]) for i in range(layout.num_layers)]


def block_shape(block: KVLayout) -> tuple[int, ...]:
    """Shape of one block's elements, [layers, 2 (K, V), heads, block_tokens, head_dim]: a packed block viewed."""
    return (block.num_layers, 2, block.num_kv_heads, block.seq_len, block.head_dim)


def to_blocks(layers: list[tuple[torch.Tensor, torch.Tensor]], block_tokens: int,
              out: torch.Tensor | None = None, only_layer: int | None = None) -> torch.Tensor:
    """The KV of `layers` (per layer (K, V) [1, heads, seq, dim]) cut into blocks of `block_tokens` tokens, each
    packed as the cache pool packs a block; the last block is zero-padded. Shape [num_blocks, layers, 2, heads,
    block_tokens, dim]. With `out` it fills that tensor (only `only_layer`'s slice when given)."""
    k0 = layers[only_layer or 0][0]
    _, heads, seq_len, dim = k0.shape
    num_blocks = -(-seq_len // block_tokens)
    if out is None:
        out = torch.zeros((num_blocks, len(layers), 2, heads, block_tokens, dim), dtype=k0.dtype)
    full = (seq_len // block_tokens) * block_tokens
    for i in ([only_layer] if only_layer is not None else range(len(layers))):
        for j, t in enumerate(layers[i]):
            if full:
                out[:seq_len // block_tokens, i, j] = t[0, :, :full].reshape(heads, -1, block_tokens, dim).transpose(0, 1)
            if full < seq_len:
                out[num_blocks - 1, i, j, :, :seq_len - full] = t[0, :, full:]
    return out


def from_blocks(blocks: torch.Tensor, num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of `to_blocks`: per layer (K, V) [1, heads, num_tokens, dim] (copies)."""
    num_blocks, num_layers, _, heads, block_tokens, dim = blocks.shape
    flat = blocks.permute(1, 2, 3, 0, 4, 5).reshape(num_layers, 2, heads, num_blocks * block_tokens, dim)
    return [(flat[i, 0, None, :, :num_tokens].clone(), flat[i, 1, None, :, :num_tokens].clone())
            for i in range(num_layers)]
