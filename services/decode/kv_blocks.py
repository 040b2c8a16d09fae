"""The decode instance's KV memory: fixed-size blocks in one tensor, each block laid out exactly as the cache pool
stores a block ([layers, 2 (K, V), heads, block_tokens, head_dim] in the model's dtype), so prefill writes a
request's KV straight into its blocks and finished blocks go to the pool as they are."""

from __future__ import annotations

import torch

from tsukimi.common.messages import KVLayout
from tsukimi.decode.block_manager import BlockManager
from tsukimi.model.kv import block_shape, from_blocks, to_blocks, torch_dtype
from tsukimi.transfer.memory import SharedRegion


class KVBlocks:
    """Block storage plus its free list. `region` (shared memory, which the worker's transfer engine adopts so
    prefill writes into the blocks) holds the blocks; without it they live in a private tensor."""

    def __init__(self, block: KVLayout, num_blocks: int, region: SharedRegion | None = None):
        # One block's shape (`seq_len` = tokens per block).
        self.block = block
        self.block_tokens = block.seq_len
        self.block_bytes = block.num_bytes
        shape = (num_blocks, *block_shape(block))
        self.region = region
        if region is None:
            self.data = torch.zeros(shape, dtype=torch_dtype(block.dtype))
        else:
            raw = torch.frombuffer(region.view, dtype=torch.uint8, count=num_blocks * self.block_bytes)
            self.data = raw.view(torch_dtype(block.dtype)).view(shape)
        self.manager = BlockManager(num_blocks)

    @classmethod
    def shared(cls, block: KVLayout, num_bytes: int) -> "KVBlocks":
        """As many blocks as fit in `num_bytes` (at least one), in a new shared-memory region."""
        num_blocks = max(1, num_bytes // block.num_bytes)
        return cls(block, num_blocks, SharedRegion.create(num_blocks * block.num_bytes))

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.manager.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def offset_of(self, block_id: int, layer: int = 0) -> int:
        """Byte offset of a block (or of one layer's K and V in it) in the buffer."""
        return block_id * self.block_bytes + layer * (self.block_bytes // self.block.num_layers)

    def write(self, block_ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copies per-layer (K, V) [1, heads, seq, dim] into `block_ids` (enough for seq tokens)."""
        packed = to_blocks(layers, self.block_tokens)
        self.data[torch.tensor(block_ids[:packed.shape[0]], dtype=torch.long)] = packed

    def read(self, block_ids: list[int], num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (K, V) [1, heads, num_tokens, dim] held in `block_ids` (copies)."""
        return from_blocks(self.data[torch.tensor(block_ids, dtype=torch.long)], num_tokens)

    def copy_out(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' contents, as a new tensor [n, *block shape]."""
        return self.data[torch.tensor(block_ids, dtype=torch.long)]

    def copy_in(self, block_ids: list[int], contents: torch.Tensor) -> None:
        """Inverse of `copy_out`."""
        self.data[torch.tensor(block_ids, dtype=torch.long)] = contents
