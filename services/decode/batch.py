"""The running decode batch: every request's KV cache in one left-padded tensor per layer, one step at a time.

Requests join and leave between steps (continuous batching). Rows are aligned on the right; the attention mask
hides each row's left padding and explicit position ids keep each row's own positions, so a request's tokens are
the ones it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Row:
    """One request in the batch."""

    # The request.
    request_id: str
    # Tokens whose KV the batch holds for this row (prompt + generated, minus the pending last token).
    num_kv_tokens: int
    # Token to feed at the next step.
    next_token_id: int


class DecodeBatch:
    """Left-padded batched KV cache of a causal LM, stepped one token per row."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.rows: list[Row] = []
        self._cache: DynamicCache | None = None
        # [batch, kv_len]: 1 where a row holds a real token, 0 on its left padding.
        self._mask = torch.zeros((0, 0), dtype=torch.long)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def kv_len(self) -> int:
        """Padded length of the batch's KV."""
        return self._mask.shape[1]

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self._cache.layers] if self._cache else []

    def _rebuild(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config) if layers else None

    def add(self, rows: list[Row], kvs: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Joins requests with their KV (per layer (K, V) of shape [1, heads, num_kv_tokens, dim])."""
        if not rows:
            return
        new_len = max([self.kv_len] + [r.num_kv_tokens for r in rows])
        old = self._layers()
        num_layers = len(kvs[0])
        merged = []
        for i in range(num_layers):
            keys, values = [], []
            if old:
                keys.append(_pad_left(old[i][0], new_len))
                values.append(_pad_left(old[i][1], new_len))
            for kv in kvs:
                keys.append(_pad_left(kv[i][0], new_len))
                values.append(_pad_left(kv[i][1], new_len))
            merged.append((torch.cat(keys), torch.cat(values)))
        masks = [_pad_left(self._mask, new_len)] if self.rows else []
        masks += [_pad_left(torch.ones((1, r.num_kv_tokens), dtype=torch.long), new_len) for r in rows]
        self._mask = torch.cat(masks)
        self.rows.extend(rows)
        self._rebuild(merged)

    def remove(self, request_ids: set[str]) -> None:
        """Drops requests and frees their KV (and any padding no remaining row needs)."""
        keep = [i for i, r in enumerate(self.rows) if r.request_id not in request_ids]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, torch.zeros((0, 0), dtype=torch.long)
            return
        index = torch.tensor(keep)
        mask = self._mask[index]
        start = int((mask.sum(0) > 0).nonzero()[0])
        self._mask = mask[:, start:].contiguous()
        self._rebuild([(k[index, :, start:].contiguous(), v[index, :, start:].contiguous()) for k, v in self._layers()])

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Feeds every row its next token; returns the logits of the token after it, [batch, vocab]."""
        input_ids = torch.tensor([[r.next_token_id] for r in self.rows], dtype=torch.long)
        positions = torch.tensor([[r.num_kv_tokens] for r in self.rows], dtype=torch.long)
        mask = torch.cat([self._mask, torch.ones((self.num_rows, 1), dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=self._cache, use_cache=True
        )
        self._cache = out.cache
        self._mask = mask
        for r in self.rows:
            r.num_kv_tokens += 1
        return out.logits[:, -1].float()

    def num_kv_bytes(self) -> int:
        """Bytes the batch's KV tensors occupy, padding included."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._layers())


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pads dim -2 (KV: sequence) or dim -1 (mask) on the left with zeros up to `length`."""
    dim = -1 if t.dim() == 2 else -2
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)
