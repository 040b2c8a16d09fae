"""The decode engine: admits requests into the running batch, steps it, samples, decides who is finished.

Plain class: the service hands it new requests and cancellations between steps and publishes the events it
returns; it never touches the bus.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from tsukimi.common.messages import DecodeTask, SamplingParams, TokenEvent
from tsukimi.decode.batch import DecodeBatch, Row
from tsukimi.model.sampler import sample_batch


@dataclass
class Sequence:
    """A request on this decode instance."""

    request_id: str
    sampling: SamplingParams
    # Output tokens produced so far, prefill's first token included.
    num_output: int
    # KV handed over by prefill, until the request joins the batch.
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    # Tokens covered by that KV.
    num_kv_tokens: int
    # Token to feed next.
    next_token_id: int


class DecodeEngine:
    """Continuous batching over a `DecodeBatch`: join between steps, leave when finished or cancelled."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_model_len: int):
        self.batch = DecodeBatch(model)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        # (batch size, context tokens, seconds) of the last step's forward and sampling (None when it ran none):
        # the samples the cost model is fitted to; joins and leaves are not timed.
        self.last_step: tuple[int, int, float] | None = None
        # Tokens of context the running batch holds; a plain int, so other threads read it while a step runs.
        self.num_context_tokens = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def progress(self) -> dict[str, tuple[int, int]]:
        """Per request held: (output tokens still to generate, context tokens at its end). Safe to call from
        another thread while a step runs (the sequences are copied in one step under the GIL)."""
        sequences = list(self.running.values()) + list(self.waiting)
        return {s.request_id: (max(0, s.sampling.max_tokens - s.num_output), s.num_kv_tokens + s.sampling.max_tokens)
                for s in sequences}

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @staticmethod
    def sequence_of(task: DecodeTask, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Sequence:
        """A sequence for a delivered task and its KV."""
        return Sequence(
            request_id=task.request.request_id,
            sampling=task.request.sampling,
            num_output=1,
            kv=kv,
            num_kv_tokens=task.num_kv_tokens,
            next_token_id=task.first_token_id,
        )

    def step(self, arrived: list[Sequence], cancelled: set[str]) -> tuple[list[TokenEvent], list[str]]:
        """Applies arrivals and cancellations, runs one batch step; returns the token events and the ids of
        requests that left (finished or cancelled)."""
        self.last_step = None
        self.waiting.extend(arrived)
        left = self._cancel(cancelled)
        self._admit()
        if not self.running:
            self.num_context_tokens = 0
            return [], left
        rows = self.batch.rows
        context = sum(r.num_kv_tokens for r in rows)
        started = time.perf_counter()
        logits = self.batch.step()
        seqs = [self.running[r.request_id] for r in rows]
        tokens = sample_batch(logits, [s.sampling for s in seqs], [s.num_output for s in seqs])
        self.last_step = (len(rows), context, time.perf_counter() - started)
        events, finished = [], set()
        for row, seq, token in zip(rows, seqs, tokens):
            index = seq.num_output
            seq.num_output += 1
            seq.num_kv_tokens += 1
            row.next_token_id = token
            reason = None
            if token in seq.sampling.stop_token_ids:
                reason = "stop"
            elif seq.num_output >= seq.sampling.max_tokens or seq.num_kv_tokens + 1 >= self.max_model_len:
                reason = "length"
            events.append(TokenEvent(request_id=seq.request_id, index=index, token_id=token, finish_reason=reason))
            if reason:
                finished.add(seq.request_id)
        self._leave(finished)
        self.num_context_tokens = sum(s.num_kv_tokens for s in self.running.values())
        return events, left + sorted(finished)

    def _cancel(self, request_ids: set[str]) -> list[str]:
        if not request_ids:
            return []
        left = [s.request_id for s in self.waiting if s.request_id in request_ids]
        self.waiting = deque(s for s in self.waiting if s.request_id not in request_ids)
        running = {rid for rid in request_ids if rid in self.running}
        self._leave(running)
        return left + sorted(running)

    def _admit(self) -> None:
        joining: list[Sequence] = []
        while self.waiting and len(self.running) + len(joining) < self.max_batch_size:
            joining.append(self.waiting.popleft())
        if not joining:
            return
        self.batch.add(
            [Row(s.request_id, s.num_kv_tokens, s.next_token_id) for s in joining], [s.kv for s in joining]
        )
        for s in joining:
            s.kv = None  # the batch holds its own copy now
            self.running[s.request_id] = s

    def _leave(self, request_ids: set[str]) -> None:
        if request_ids:
            self.batch.remove(request_ids)
            for rid in request_ids:
                self.running.pop(rid, None)
