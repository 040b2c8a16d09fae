"""A request's KV on its way to the decode worker's blocks: written layer by layer while prefill computes the next
layer (layer-wise transfer), or all at once after the forward.

Prefill's compute thread calls `send_layer` as each layer finishes; the writes are submitted on the event loop
through the transfer engine, so the next layer computes while they move. `finish` waits for every write and says
how much of the transfer was hidden behind compute.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass

import torch

from tsukimi.common.messages import KVLayout, KVReservation
from tsukimi.model.kv import to_blocks, torch_dtype
from tsukimi.transfer.batch import Op, TransferRequest
from tsukimi.transfer.engine import TransferEngine


@dataclass
class StreamTiming:
    """How one request's KV transfer went."""

    # Seconds from the first write submitted to the last one done.
    transfer_s: float
    # Seconds of it after the forward had finished (what the request waited for).
    exposed_s: float

    @property
    def hidden_share(self) -> float:
        """Share of the transfer that overlapped compute (0 when the transfer took no time)."""
        return 1.0 - self.exposed_s / self.transfer_s if self.transfer_s > 0 else 0.0


class KVStream:
    """Writes one request's KV into the decode blocks of `reservation` on `segment`."""

    def __init__(self, transfer: TransferEngine, loop: asyncio.AbstractEventLoop, segment: str,
                 reservation: KVReservation, block: KVLayout, num_tokens: int):
        if reservation.block_bytes != block.num_bytes or reservation.block_tokens != block.seq_len:
            raise ValueError(f"decode blocks of {reservation.block_tokens} tokens / {reservation.block_bytes} bytes "
                             f"do not match this model's {block.seq_len} tokens / {block.num_bytes} bytes")
        self.transfer = transfer
        self.loop = loop
        self.segment = segment
        self.reservation = reservation
        self.block = block
        self.num_tokens = num_tokens
        num_blocks = len(reservation.block_ids)
        # The KV packed as decode's blocks, filled a layer at a time.
        self.staging = torch.zeros((num_blocks, block.num_layers, 2, block.num_kv_heads, block.seq_len,
                                    block.head_dim), dtype=torch_dtype(block.dtype))
        self.local = transfer.register(self.staging.view(-1).view(torch.uint8).numpy(), read_only=True)
        self._writes: list[concurrent.futures.Future] = []
        self._first_submit = 0.0
        self._last_done = 0.0

    @property
    def has_failed(self) -> bool:
        """Whether a write already failed (prefill may stop computing)."""
        return any(f.done() and f.exception() is not None for f in self._writes)

    def send_layer(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Packs layer `index`'s KV ([1, heads, num_tokens, dim]) and submits its writes; from any thread."""
        layers = [None] * self.block.num_layers
        layers[index] = (keys, values)
        to_blocks(layers, self.block.seq_len, out=self.staging, only_layer=index)
        layer_bytes = self.block.num_bytes // self.block.num_layers
        self._submit([(j * self.block.num_bytes + index * layer_bytes,
                       block_id * self.block.num_bytes + index * layer_bytes, layer_bytes)
                      for j, block_id in enumerate(self.reservation.block_ids)])

    def send_all(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Packs and submits the whole KV at once (after the forward)."""
        to_blocks(kv, self.block.seq_len, out=self.staging)
        size = self.block.num_bytes
        self._submit([(j * size, block_id * size, size) for j, block_id in enumerate(self.reservation.block_ids)])

    def _submit(self, pieces: list[tuple[int, int, int]]) -> None:
        # NOTE: each write carries the reservation's nonce: decode's write guard refuses it once the blocks are no
        # longer this reservation's (freed as an orphan, perhaps given to another request).
        nonce = self.reservation.nonce
        requests = [TransferRequest(Op.WRITE, self.local, local, self.segment, self.reservation.buffer_id, target,
                                    length, nonce) for local, target, length in pieces]
        if not self._first_submit:
            self._first_submit = time.perf_counter()
        # NOTE: from the compute thread or the loop's own; either way the write runs on the loop, and its
        # concurrent future may be polled from any thread (`has_failed`).
        self._writes.append(asyncio.run_coroutine_threadsafe(self._write(requests), self.loop))

    async def _write(self, requests: list[TransferRequest]) -> None:
        await self.transfer.transfer(requests)
        self._last_done = max(self._last_done, time.perf_counter())

    async def finish(self, computed_at: float) -> StreamTiming:
        """Waits for every write; raises the first write's error. `computed_at`: perf_counter when the forward
        ended."""
        for result in await self.settle():
            if isinstance(result, BaseException):
                raise result
        return StreamTiming(max(0.0, self._last_done - self._first_submit), max(0.0, self._last_done - computed_at))

    async def settle(self) -> list:
        """Waits for every write to be over, whatever its outcome (before the blocks may be released); returns
        each write's result or exception."""
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in self._writes), return_exceptions=True)

    def close(self) -> None:
        self.transfer.unregister(self.local)
