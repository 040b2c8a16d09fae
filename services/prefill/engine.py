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
from tsukimi.prefill.packed_cache import PackedCache


@dataclass
class PrefillResult:
    """What one prefill produces."""

    # Logits of the token after the prompt, shape [vocab].
    logits: torch.Tensor
    # Per layer (K, V), each [1, kv_heads, prompt_len, head_dim].
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class PrefillStopped(Exception):
    """A prefill was stopped between two chunks or layers (`should_stop` said so)."""


class _AllStopped(Exception):
    """Ends a shared forward early: every job in it stopped."""


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

    @torch.inference_mode()
    def step(self, parts: list[tuple["PrefillJob", int]]) -> dict["PrefillJob", PrefillStopped]:
        """One forward computing the next `num_tokens` of each (job, num_tokens) in `parts`: one job alone, or
        several jobs' chunks packed into one row where each attends only to its own prompt. A job's last chunk
        makes its `result`. Returns the jobs that stopped (`should_stop` said so before the forward or after a
        layer), with why; they keep nothing, and the others go on (the forward ends early when all stopped)."""
        stopped = {}
        running = []
        for job, n in parts:
            reason = job._stop_reason(f"stopped before the chunk at token {job.num_prefix + job.num_computed}")
            if reason is not None:
                stopped[job] = reason
            else:
                running.append((job, min(n, job.num_remaining)))
        if not running:
            return stopped

        def layer_done(index: int) -> None:
            for job, n in running:
                if job in stopped:
                    continue
                reason = job._stop_reason(f"stopped after layer {index}")
                if reason is not None:
                    stopped[job] = reason
                elif job._on_layer is not None and job.is_last(n):
                    layer = job._cache.layers[index]
                    job._on_layer(index, layer.keys, layer.values)
            if len(stopped) == len(parts):
                raise _AllStopped()

        model = self.model
        reports = any(job._on_layer is not None or job._should_stop is not None for job, _ in running)
        tokens = [token for job, n in running for token in job._rest[job.num_computed:job.num_computed + n]]
        try:
            with self.compute(), _LayerHooks.listening(model, layer_done if reports else None):
                started = time.perf_counter()
                input_ids = torch.tensor([tokens], dtype=torch.long)
                if len(running) == 1:
                    logits = model(input_ids=input_ids, cache=running[0][0]._cache, use_cache=True,
                                   logits_to_keep=1).logits[0]
                else:
                    cache = PackedCache([job._cache for job, _ in running], [n for _, n in running])
                    logits = model(input_ids=input_ids, attention_mask=cache.mask, position_ids=cache.position_ids,
                                   cache=cache, use_cache=True, logits_to_keep=cache.last_indices).logits[0]
                seconds = time.perf_counter() - started
        except _AllStopped:
            seconds = None
        for job, _ in running:
            if job in stopped:
                job._cache = None
        if seconds is None:
            return stopped
        for row, (job, n) in enumerate(running):
            if job not in stopped:
                # NOTE: a shared forward's time is split by tokens fed (what the cost model is corrected with).
                job._advance(n, logits[row], seconds * n / len(tokens))
        return stopped

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

    def is_last(self, num_tokens: int) -> bool:
        """Whether computing `num_tokens` more ends the prompt."""
        return num_tokens >= self.num_remaining

    def step(self, num_tokens: int = 0) -> None:
        """Computes the next chunk (`num_tokens`, or the engine's chunk size, or the whole rest without chunking)
        in a forward of its own; the last one makes `result`."""
        n = num_tokens or self.engine.chunk_tokens or self.num_remaining
        stopped = self.engine.step([(self, n)])
        if self in stopped:
            raise stopped[self]

    def _stop_reason(self, when: str) -> PrefillStopped | None:
        if self._should_stop is not None and self._should_stop():
            return PrefillStopped(when)
        return None

    def _advance(self, num_tokens: int, logits: torch.Tensor, compute_s: float) -> None:
        self.num_computed += num_tokens
        self.compute_s += compute_s
        if self.num_remaining == 0:
            self.result = PrefillResult(logits=logits.float(),
                                        kv=[(layer.keys, layer.values) for layer in self._cache.layers])
            self._cache = None
