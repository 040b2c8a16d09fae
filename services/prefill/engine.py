"""Runs a prompt through the model once: its KV cache and the logits of the next token."""

from __future__ import annotations

import threading
import time
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

    def start(self, prompt_token_ids: list[int], prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
              on_layer: LayerCallback | None = None, should_stop: Callable[[], bool] | None = None) -> "PrefillJob":
        """A prefill of one prompt, to be run a chunk at a time (`PrefillJob.step`), so other prompts' chunks
        can run in between. With `prefix_kv` (the KV of the prompt's first tokens, e.g. loaded from the cache
        pool) only the remaining tokens are computed; at least the last token always is.

        `on_layer` is called (in the stepping thread) as each layer of the last forward finishes, with that
        layer's whole KV, while the next layer computes (layer-wise transfer). `should_stop` is asked before every
        chunk and after every layer; when it says so, PrefillStopped is raised and nothing is kept."""
        return PrefillJob(self, prompt_token_ids, prefix_kv, on_layer, should_stop)

    def run(self, prompt_token_ids: list[int], prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
            on_layer: LayerCallback | None = None, should_stop: Callable[[], bool] | None = None) -> PrefillResult:
        """Prefills one prompt, every chunk in a row (see `start`)."""
        job = self.start(prompt_token_ids, prefix_kv, on_layer, should_stop)
        while not job.is_done:
            job.step()
        return job.result


class PrefillJob:
    """One prompt's prefill in progress: `step` computes its next chunk."""

    def __init__(self, engine: PrefillEngine, prompt_token_ids: list[int],
                 prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, on_layer: LayerCallback | None,
                 should_stop: Callable[[], bool] | None):
        self.engine = engine
        self.num_prefix = prefix_kv[0][0].shape[2] if prefix_kv else 0
        if self.num_prefix >= len(prompt_token_ids):
            raise ValueError(f"prefix of {self.num_prefix} tokens leaves nothing to compute of {len(prompt_token_ids)}")
        config = engine.model.config
        self._cache = DynamicCache(ddp_cache_data=prefix_kv, config=config) if prefix_kv else DynamicCache(
            config=config)
        self._rest = prompt_token_ids[self.num_prefix:]
        self._on_layer = on_layer
        self._should_stop = should_stop
        # Tokens of `_rest` computed so far.
        self.num_computed = 0
        # Seconds spent in this job's forwards.
        self.compute_s = 0.0
        self.result: PrefillResult | None = None

    @property
    def is_done(self) -> bool:
        return self.result is not None

    @property
    def num_remaining(self) -> int:
        """Prompt tokens still to compute."""
        return len(self._rest) - self.num_computed

    @torch.inference_mode()
    def step(self) -> None:
        """Computes the next chunk (the whole rest without chunking); the last one makes `result`."""
        stop = self._should_stop
        start = self.num_computed
        if stop is not None and stop():
            raise PrefillStopped(f"stopped before the chunk at token {self.num_prefix + start}")
        end = min(len(self._rest), start + (self.engine.chunk_tokens or len(self._rest)))
        is_last = end == len(self._rest)
        cache, on_layer = self._cache, self._on_layer

        def layer_done(index: int) -> None:
            if stop is not None and stop():
                raise PrefillStopped(f"stopped after layer {index}")
            if is_last and on_layer is not None:
                layer = cache.layers[index]
                on_layer(index, layer.keys, layer.values)

        model = self.engine.model
        with self.engine.compute(), _LayerHooks.listening(model, layer_done if (on_layer or stop) else None):
            started = time.perf_counter()
            out = model(input_ids=torch.tensor([self._rest[start:end]], dtype=torch.long), cache=cache,
                        use_cache=True, logits_to_keep=1)
            self.compute_s += time.perf_counter() - started
        self._cache = out.cache
        self.num_computed = end
        if is_last:
            self.result = PrefillResult(logits=out.logits[0, -1].float(),
                                        kv=[(layer.keys, layer.values) for layer in self._cache.layers])
            self._cache = None
