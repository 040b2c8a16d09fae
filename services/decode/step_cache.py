"""The cache object a paged decode step hands the model: it writes each row's new K and V into that row's block
slot and gives attention the row's blocks gathered in order (right-padded to the longest row; the step's 4D mask
hides the padding). Duck-typed to what transformers' attention layers call on a cache (`update`)."""

from __future__ import annotations

import torch

from tsukimi.decode.kv_blocks import KVBlocks


class StepCache:
    """One decode step over rows with block tables; every row feeds one token."""

    def __init__(self, kv: KVBlocks, block_tables: list[list[int]], num_kv_tokens: list[int]):
        self.kv = kv
        bt = kv.block_tokens
        num_table = max(len(t) for t in block_tables)
        # [rows, longest table]: each row's blocks, padded with its first block (masked anyway).
        self.tables = torch.tensor([t + [t[0]] * (num_table - len(t)) for t in block_tables], dtype=torch.long)
        self.num_table = num_table
        self.flat_tables = self.tables.flatten()
        # Block and slot of each row's new token.
        self.slot_blocks = torch.tensor([t[n // bt] for t, n in zip(block_tables, num_kv_tokens)], dtype=torch.long)
        self.slot_offsets = torch.tensor([n % bt for n in num_kv_tokens], dtype=torch.long)
        positions = torch.arange(num_table * bt)
        # [rows, 1, 1, kv_len]: True where a row holds a real token (its own, plus the one fed now).
        self.mask = (positions[None, :] <= torch.tensor(num_kv_tokens)[:, None])[:, None, None, :]
        self.position_ids = torch.tensor(num_kv_tokens, dtype=torch.long)[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the rows' new K, V ([rows, heads, 1, dim]) and returns every row's K, V [rows, heads, kv_len,
        dim]."""
        layer = self.kv.data[:, layer_idx]
        rows, heads, _, dim = key_states.shape
        out = []
        for j, states in enumerate((key_states, value_states)):
            store = layer[:, j]
            store[self.slot_blocks, :, self.slot_offsets] = states[:, :, 0]
            # NOTE: gathered head by head with index_select into [heads, rows, blocks * bt, dim], whose transpose
            # is the [rows, heads, kv_len, dim] view attention takes: one plain copy of the context per step, as a
            # contiguous cache appended to would make. Advanced indexing (`store[tables]`) and its transpose were
            # two, and several times slower on the CPU.
            gathered = torch.empty((heads, rows * self.num_table, *store.shape[2:]), dtype=store.dtype)
            for head in range(heads):
                torch.index_select(store[:, head], 0, self.flat_tables, out=gathered[head])
            out.append(gathered.view(heads, rows, -1, dim).transpose(0, 1))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.mask.shape[-1]) - 1
