"""Colocated worker (`tsukimi up --colocated`): the vLLM-style baseline Mooncake compares against.

One process is one device: it does both the prefill and the decode of its requests, with one compute thread at a
time. It hosts the ordinary `PrefillService` and `DecodeService` (instance ids `<name>-prefill` and
`<name>-decode`, heartbeating as kinds prefill and decode, each naming the other in `colocated_with`) over one
loaded model, and every model forward of either takes the process's `ComputeLock`:

- without chunked prefill a prompt's whole forward runs between two decode steps (the running batch stalls for
  it, as on a vLLM GPU without chunked prefill);
- with `chunked_prefill_tokens` = K the prompt runs in forwards of K tokens, and after each chunk prefill lets
  the decode batch take one step before its next chunk (one chunk of prefill per decode step).

The conductor (`placement_policy=colocated`) sends a request's prefill and decode to the same pair, the least
loaded one. Prefill hands the KV to its own decode half exactly as when disaggregated: reserve, WRITE through the
transfer engine (shared memory: a memcpy within the process), hand over; one code path, and for these models
the copy is small next to the forward.

Prefix cache (`is_cache_enabled`): the instance's own `LocalPrefixCache` in its own memory (vLLM's automatic
prefix caching), bounded by `local_prefix_cache_bytes`, LRU; the pool (cachestores) is not used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from tsukimi.kvpool.block_keys import block_keys
from tsukimi.common.messages import KVLayout
from tsukimi.model.kv import join_blocks, split_blocks

log = logging.getLogger("tsukimi.colocated")

# Most seconds a prefill chunk waits for the decode step it lets go first (a safety net: the decode loop may
# be between steps for other reasons).
TURN_TIMEOUT_S = 0.5


class ComputeLock:
    """The one device of a colocated worker: model forwards run one at a time, in the order they asked (FIFO
    tickets, so a waiting decode step is not overtaken by the next prefill chunk that asks after it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        # Decode steps completed (prefill chunks wait for the next one).
        self.num_decode_steps = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Runs the block with the device to itself."""
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()

    @property
    def is_held(self) -> bool:
        return self._serving != self._next_ticket

    def decode_step_done(self) -> None:
        """Called by decode after each step (outside `hold`)."""
        with self._cond:
            self.num_decode_steps += 1
            self._cond.notify_all()

    def wait_decode_step(self, since: int, has_work: Callable[[], bool], timeout_s: float = TURN_TIMEOUT_S) -> bool:
        """Waits until a decode step after the `since`-th one is done, or decode has no work; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.num_decode_steps > since or not has_work(), timeout_s)

    def chunk_turns(self, has_decode_work: Callable[[], bool]) -> Callable[[], AbstractContextManager]:
        """A `compute` context for prefill's chunks: each chunk holds the device, then (when decode has work)
        waits for one decode step before the next chunk may ask for it."""

        @contextmanager
        def chunk() -> Iterator[None]:
            with self.hold():
                yield
                done = self.num_decode_steps
            if has_decode_work():
                self.wait_decode_step(done, has_decode_work)

        return chunk


class LocalPrefixCache:
    """An instance's own prefix cache: packed KV blocks by chained block key, in its memory, LRU-bounded.

    Same interface as the pool's `PrefixCache` (load, store, is_available, close). A prompt's blocks are made
    most recent last block first, so its first block is the most recent: eviction takes a chain's tail first and
    a surviving block's whole prefix usually survives with it (what vLLM does freeing a request's blocks in
    reverse order).
    """

    def __init__(self, model: str, block_tokens: int, capacity_bytes: int):
        self.model = model
        self.block_tokens = block_tokens
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.num_evicted = 0

    is_available = True

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def keys(self) -> list[bytes]:
        """Keys held, least recently used first."""
        return list(self._blocks)

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def lookup(self, prompt: list[int]) -> tuple[list[bytes], list[torch.Tensor]]:
        """Keys and blocks of the longest cached prefix of `prompt` (whole blocks, at least one token left to
        compute); marks them used."""
        keys = block_keys(prompt, self.block_tokens, self.model)[: (len(prompt) - 1) // self.block_tokens]
        found: list[bytes] = []
        for key in keys:
            if key not in self._blocks:
                break
            found.append(key)
        self._touch(found)
        return found, [self._blocks[k] for k in found]

    async def load(self, prompt: list[int], block_layout: KVLayout) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        _, blocks = self.lookup(prompt)
        return join_blocks(block_layout, blocks) if blocks else None

    def put(self, keys: list[bytes], blocks: list[torch.Tensor]) -> int:
        """Stores `blocks` under `keys` (a prompt's chain, in order); returns how many were new."""
        num_new = 0
        for key, block in zip(keys, blocks):
            if key in self._blocks or block.numel() > self.capacity_bytes:
                continue
            self._blocks[key] = block
            self.num_bytes += block.numel()
            num_new += 1
        self._touch([k for k in keys if k in self._blocks])
        while self.num_bytes > self.capacity_bytes:
            _, block = self._blocks.popitem(last=False)
            self.num_bytes -= block.numel()
            self.num_evicted += 1
        return num_new

    async def store(self, prompt: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]], num_cached_blocks: int
                    ) -> int:
        keys = block_keys(prompt, self.block_tokens, self.model)
        if len(keys) <= num_cached_blocks:
            return 0
        # NOTE: split_blocks copies, so a block does not pin the request's whole KV.
        blocks = split_blocks([(k[:, :, num_cached_blocks * self.block_tokens:],
                                v[:, :, num_cached_blocks * self.block_tokens:]) for k, v in kv], self.block_tokens)
        return self.put(keys[num_cached_blocks:], blocks[:len(keys) - num_cached_blocks])

    async def close(self) -> None:
        return None


def _locked_decode_engine(lock: ComputeLock):
    from tsukimi.decode.engine import DecodeEngine

    class LockedDecodeEngine(DecodeEngine):
        """A decode engine whose steps take the device."""

        def step(self, arrived, cancelled):
            try:
                with lock.hold():
                    return super().step(arrived, cancelled)
            finally:
                lock.decode_step_done()

    return LockedDecodeEngine


def main(settings) -> None:
    """Runs one colocated worker (prefill + decode over one model and one device) until SIGINT/SIGTERM."""
    from tsukimi.common.service_runtime import run_with_probe
    from tsukimi.decode import calibration as decode_calibration
    from tsukimi.decode.arena_size import arena_for
    from tsukimi.decode.kv_blocks import KVBlocks
    from tsukimi.decode.service import DecodeService, bound_by_tbt
    from tsukimi.model.kv import block_layout
    from tsukimi.model.loader import load_model
    from tsukimi.model.spec import max_model_len
    from tsukimi.prefill import calibration as prefill_calibration
    from tsukimi.prefill.engine import PrefillEngine
    from tsukimi.prefill.service import PrefillService
    from tsukimi.worker.runtime import prepare_worker

    prepare_worker(settings, "colocated")
    name = settings.instance_id or f"colocated-{socket.gethostname()}-{os.getpid()}"
    prefill_id, decode_id = f"{name}-prefill", f"{name}-decode"
    model = load_model(settings.model)
    max_len = max_model_len(settings.model)
    lock = ComputeLock()
    block = block_layout(model, settings.cache_block_tokens)
    kv = KVBlocks.shared(block, arena_for(settings, block).num_bytes)
    decode_engine = _locked_decode_engine(lock)(model, settings.max_batch_size, max_len, kv)
    chunk = settings.chunked_prefill_tokens
    prefill_engine = PrefillEngine(model, chunk, lock.chunk_turns(decode_engine.has_work) if chunk else lock.hold)
    # NOTE: calibrated one after the other before serving: nothing else holds the device yet.
    prefill_costs = prefill_calibration.measure(prefill_engine, max_len)
    decode_costs = decode_calibration.measure(decode_engine)
    cache = None
    if settings.is_cache_enabled and settings.local_prefix_cache_bytes > 0:
        cache = LocalPrefixCache(settings.model_name(), settings.cache_block_tokens, settings.local_prefix_cache_bytes)
    prefill = PrefillService(settings.model_copy(update={"instance_id": prefill_id}), prefill_engine, max_len,
                             prefill_costs, cache=cache, colocated_with=decode_id)
    decode = DecodeService(settings.model_copy(update={"instance_id": decode_id}),
                           bound_by_tbt(decode_engine, decode_costs, settings.tbt_slo_s), decode_costs,
                           colocated_with=prefill_id, cache=cache)
    log.info("colocated worker %s: chunked prefill %s, local prefix cache %s", name,
             f"{chunk} tokens" if chunk else "off",
             f"{settings.local_prefix_cache_bytes >> 20} MiB" if cache else "off")

    async def run(stop: asyncio.Event) -> None:
        await asyncio.gather(prefill.run(stop), decode.run(stop))

    def health() -> tuple[bool, dict]:
        ok = all(s.nc is not None and s.nc.is_connected for s in (prefill, decode))
        return ok, {"instance_id": name, "waiting": prefill.queue.qsize(), "running": decode_engine.num_running}

    run_with_probe("colocated", settings.host, settings.metrics_port, run, health)
