"""Runs a prompt through the model once: its KV cache and the logits of the next token."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from tsukimi.common.messages import KVLayout
from tsukimi.model.kv import block_layout


@dataclass
class PrefillResult:
    """What one prefill produces."""

    # Logits of the token after the prompt, shape [vocab].
    logits: torch.Tensor
    # Per layer (K, V), each [1, kv_heads, prompt_len, head_dim].
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class PrefillStopped(Exception):
    """A prefill was stopped between two chunks or layers (`should_stop` said so)."""


# (layer index, its K, its V [1, heads, prompt_len, dim]) once that layer of the prompt's last forward is done.
LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class _LayerHooks:
    """Forward hooks on a model's decoder layers, installed once per model, reporting each finished layer to the
    listener of the prefill forward running now in the listener's own thread (forwards of other users of the
    model, e.g. a colocated decode engine, are not reported)."""

    @staticmethod
    def install(model: torch.nn.Module) -> None:
        if hasattr(model, "_tsukimi_layer_listener"):
            return
        # (thread ident, listener) of the forward being reported, or None.
        model._tsukimi_layer_listener = None
        for index, layer in enumerate(model.get_decoder().layers):
            layer.register_forward_hook(lambda module, args, output, index=index: _LayerHooks._report(model, index))

    @staticmethod
    def _report(model: torch.nn.Module, index: int) -> None:
        listening = model._tsukimi_layer_listener
        if listening is not None and listening[0] == threading.get_ident():
            listening[1](index)

    @staticmethod
    @contextmanager
    def listening(model: torch.nn.Module, listener: Callable[[int], None] | None) -> Iterator[None]:
        model._tsukimi_layer_listener = (threading.get_ident(), listener) if listener else None
        try:
            yield
        finally:
            model._tsukimi_layer_listener = None


class PrefillEngine:
    """Computes prompts' KV caches with a Hugging Face causal LM."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 0,
                 compute: Callable[[], AbstractContextManager] = nullcontext):
        self.model = model
        # Prompt tokens per forward (chunked prefill); 0: the whole prompt in one forward.
        self.chunk_tokens = chunk_tokens
        # Context every forward runs in (the colocated worker's device lock); the lock is let go between chunks.
        self.compute = compute
        _LayerHooks.install(model)

    def block_layout(self, block_tokens: int) -> KVLayout:
        """Shape of one cache block of this model's KV."""
        return block_layout(self.model, block_tokens)

    @torch.inference_mode()
    def run(self, prompt_token_ids: list[int], prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
            on_layer: LayerCallback | None = None, should_stop: Callable[[], bool] | None = None) -> PrefillResult:
        """Prefills one prompt. With `prefix_kv` (the KV of the prompt's first tokens, e.g. loaded from the
        cache pool) only the remaining tokens are computed; at least the last token always is.

        `on_layer` is called (in this thread) as each layer of the last forward finishes, with that layer's whole
        KV, while the next layer computes (layer-wise transfer). `should_stop` is asked before every chunk and
        after every layer; when it says so, PrefillStopped is raised and nothing is kept."""
        num_prefix = prefix_kv[0][0].shape[2] if prefix_kv else 0
        if num_prefix >= len(prompt_token_ids):
            raise ValueError(f"prefix of {num_prefix} tokens leaves nothing to compute of {len(prompt_token_ids)}")
        cache = DynamicCache(ddp_cache_data=prefix_kv, config=self.model.config) if prefix_kv else DynamicCache(
            config=self.model.config)
        rest = prompt_token_ids[num_prefix:]
        step = self.chunk_tokens or len(rest)
        for start in range(0, len(rest), step):
            if should_stop is not None and should_stop():
                raise PrefillStopped(f"stopped before the chunk at token {num_prefix + start}")
            input_ids = torch.tensor([rest[start:start + step]], dtype=torch.long)
            is_last = start + step >= len(rest)

            def layer_done(index: int, cache=cache, is_last=is_last) -> None:
                if should_stop is not None and should_stop():
                    raise PrefillStopped(f"stopped after layer {index}")
                if is_last and on_layer is not None:
                    layer = cache.layers[index]
                    on_layer(index, layer.keys, layer.values)

            with self.compute(), _LayerHooks.listening(self.model, layer_done if (on_layer or should_stop) else None):
                out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return PrefillResult(logits=out.logits[0, -1].float(), kv=kv)
