"""The decode engine: admits requests into the running batch, steps it, samples, decides who is finished.

KV is paged: each sequence owns a block table over the instance's `KVBlocks`, one more block whenever its tokens
fill the last one. The batch grows while the predicted step time stays within the TBT budget and the batch limit;
when a running sequence needs a block and none is free, the most recently admitted other sequence is preempted
(its blocks copied out and freed) and resumes, blocks copied back, before anything new is admitted.

Plain class: the service hands it new requests and cancellations between steps and publishes the events it
returns; it never touches the bus.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tsukimi.common.messages import DecodeTask, SamplingParams, TokenEvent
from tsukimi.decode.block_manager import NoFreeBlocks
from tsukimi.decode.kv_blocks import KVBlocks
from tsukimi.decode.step_cache import StepCache
from tsukimi.model.sampler import sample_batch

log = logging.getLogger("tsukimi.decode")


@dataclass
class Sequence:
    """A request on this decode instance."""

    request_id: str
    sampling: SamplingParams
    # Output tokens produced so far, prefill's first token included.
    num_output: int
    # Blocks holding its KV, in token order.
    block_ids: list[int]
    # Tokens whose KV it holds.
    num_kv_tokens: int
    # Token to feed next.
    next_token_id: int
    # Tokens whose KV it holds, in order (prompt, then each output once fed); empty when not known.
    token_ids: list[int] = field(default_factory=list)
    # Contents of its blocks while preempted (its block ids are then freed and empty).
    swapped: torch.Tensor | None = None


class DecodeEngine:
    """Continuous batching over paged KV: join between steps, leave when finished or cancelled."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_model_len: int, kv: KVBlocks,
                 predict_step_s: Callable[[int, int], float] | None = None, step_budget_s: float = 0.0):
        self.model = model
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        # (batch size, context tokens) -> predicted seconds of a step; None: only the batch limit bounds the batch.
        self.predict_step_s = predict_step_s
        # Seconds a step may take (the TBT target); a sequence joins only if the step stays within it.
        self.step_budget_s = step_budget_s
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        # (batch size, context tokens, seconds) of the last step's forward and sampling (None when it ran none):
        # the samples the cost model is fitted to; joins and leaves are not timed.
        self.last_step: tuple[int, int, float] | None = None
        # Tokens of context the running batch holds; a plain int, so other threads read it while a step runs.
        self.num_context_tokens = 0
        # Preemptions so far.
        self.num_preempted = 0
        # Called with each finished (not cancelled) sequence before its blocks are freed, in the step's thread; the
        # ids it takes out of `seq.block_ids` are not freed (it frees them itself, later).
        self.on_finish: Callable[[Sequence], None] | None = None

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def predicted_step_s(self) -> float:
        """Predicted seconds of the next step of the running batch (0 without a predictor or batch)."""
        if self.predict_step_s is None or not self.running:
            return 0.0
        return self.predict_step_s(len(self.running), self.num_context_tokens)

    def progress(self) -> dict[str, tuple[int, int]]:
        """Per request held: (output tokens still to generate, context tokens at its end). Safe to call from
        another thread while a step runs (the sequences are copied in one step under the GIL)."""
        sequences = list(self.running.values()) + list(self.waiting)
        left = {s.request_id: max(0, s.sampling.max_tokens - s.num_output) for s in sequences}
        return {s.request_id: (left[s.request_id], min(self.max_model_len, s.num_kv_tokens + left[s.request_id]))
                for s in sequences}

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @staticmethod
    def sequence_of(task: DecodeTask, block_ids: list[int]) -> Sequence:
        """A sequence for a delivered task whose KV is already in `block_ids`."""
        request = task.request
        return Sequence(
            request_id=request.request_id, sampling=request.sampling, num_output=1, block_ids=block_ids,
            num_kv_tokens=task.num_kv_tokens, next_token_id=task.first_token_id,
            token_ids=list(request.prompt_token_ids) if len(request.prompt_token_ids) == task.num_kv_tokens else [],
        )

    def sequence_with_kv(self, request_id: str, sampling: SamplingParams, kv: list[tuple[torch.Tensor, torch.Tensor]],
                         first_token_id: int, token_ids: list[int] | None = None) -> Sequence:
        """A sequence whose KV (per layer (K, V) [1, heads, seq, dim]) is copied into newly allocated blocks;
        raises NoFreeBlocks."""
        num_tokens = kv[0][0].shape[2]
        block_ids = self.kv.manager.allocate(self.kv.num_blocks_for(num_tokens))
        self.kv.write(block_ids, kv)
        return Sequence(request_id, sampling, 1, block_ids, num_tokens, first_token_id, list(token_ids or []))

    def step(self, arrived: list[Sequence], cancelled: set[str]) -> tuple[list[TokenEvent], list[str]]:
        """Applies arrivals and cancellations, runs one batch step; returns the token events and the ids of
        requests that left (finished or cancelled)."""
        self.last_step = None
        self.waiting.extend(arrived)
        left = self._cancel(cancelled)
        self._admit()
        self._grow()
        if not self.running:
            self.num_context_tokens = 0
            return [], left
        seqs = list(self.running.values())
        context = sum(s.num_kv_tokens for s in seqs)
        started = time.perf_counter()
        logits = self._forward(seqs)
        tokens = sample_batch(logits, [s.sampling for s in seqs], [s.num_output for s in seqs])
        self.last_step = (len(seqs), context, time.perf_counter() - started)
        events, finished = [], []
        for seq, token in zip(seqs, tokens):
            index = seq.num_output
            if seq.token_ids:
                seq.token_ids.append(seq.next_token_id)
            seq.num_output += 1
            seq.num_kv_tokens += 1
            seq.next_token_id = token
            reason = None
            if token in seq.sampling.stop_token_ids:
                reason = "stop"
            elif seq.num_output >= seq.sampling.max_tokens or seq.num_kv_tokens + 1 >= self.max_model_len:
                reason = "length"
            events.append(TokenEvent(request_id=seq.request_id, index=index, token_id=token, finish_reason=reason))
            if reason:
                finished.append(seq)
        for seq in finished:
            if self.on_finish is not None:
                self.on_finish(seq)
            self._free(self.running.pop(seq.request_id))
        self.num_context_tokens = sum(s.num_kv_tokens for s in self.running.values())
        return events, left + sorted(s.request_id for s in finished)

    @torch.inference_mode()
    def _forward(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feeds every running sequence its next token; returns the logits of the token after it, [rows, vocab]."""
        cache = StepCache(self.kv, [s.block_ids for s in seqs], [s.num_kv_tokens for s in seqs])
        input_ids = torch.tensor([[s.next_token_id] for s in seqs], dtype=torch.long)
        out = self.model(input_ids=input_ids, attention_mask=cache.mask, position_ids=cache.position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _free(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.kv.manager.free(seq.block_ids)
            seq.block_ids = []
        seq.swapped = None

    def _cancel(self, request_ids: set[str]) -> list[str]:
        if not request_ids:
            return []
        left = []
        for seq in [s for s in self.waiting if s.request_id in request_ids]:
            self.waiting.remove(seq)
            self._free(seq)
            left.append(seq.request_id)
        for rid in sorted(request_ids & self.running.keys()):
            self._free(self.running.pop(rid))
            left.append(rid)
        return left

    def _fits_batch(self, seq: Sequence) -> bool:
        """Whether the batch may grow by `seq` (batch limit, predicted step within the budget)."""
        if len(self.running) >= self.max_batch_size:
            return False
        if self.predict_step_s is None or not self.running or self.step_budget_s <= 0:
            return True
        context = sum(s.num_kv_tokens for s in self.running.values()) + seq.num_kv_tokens
        return self.predict_step_s(len(self.running) + 1, context) <= self.step_budget_s

    def _has_blocks(self, seq: Sequence) -> bool:
        """Whether `seq` holds its blocks or can get them back now."""
        # NOTE: resuming keeps one block per running sequence free, so it does not preempt again at once.
        return seq.swapped is None or self.kv.manager.can_allocate(len(seq.swapped) + len(self.running))

    def _admit(self) -> None:
        """Joins waiting sequences in order while the batch may grow; a preempted one that cannot get its blocks
        back yet lets those behind it that hold theirs go first (they need none, and free blocks as they finish)."""
        for seq in list(self.waiting):
            if not self._fits_batch(seq):
                break
            if not self._has_blocks(seq):
                continue
            self.waiting.remove(seq)
            if seq.swapped is not None:
                seq.block_ids = self.kv.manager.allocate(len(seq.swapped))
                self.kv.copy_in(seq.block_ids, seq.swapped)
                seq.swapped = None
            self.running[seq.request_id] = seq

    def _grow(self) -> None:
        """Gives every running sequence whose blocks are full a block for the token it feeds next, preempting
        others when none is free."""
        for seq in list(self.running.values()):
            if seq.request_id not in self.running or seq.num_kv_tokens < len(seq.block_ids) * self.kv.block_tokens:
                continue
            while True:
                try:
                    seq.block_ids += self.kv.manager.allocate(1)
                    break
                except NoFreeBlocks:
                    victim = self._victim(seq)
                    self._preempt(victim)
                    if victim is seq:
                        break

    def _victim(self, needy: Sequence) -> Sequence:
        """Whom to preempt for `needy`: a waiting sequence still holding blocks (latest arrival first), else the
        most recently admitted running one (possibly `needy` itself)."""
        for seq in reversed(self.waiting):
            if seq.block_ids:
                return seq
        return next(reversed(self.running.values()))

    def _preempt(self, seq: Sequence) -> None:
        seq.swapped = self.kv.copy_out(seq.block_ids)
        self.kv.manager.free(seq.block_ids)
        seq.block_ids = []
        self.num_preempted += 1
        if self.running.pop(seq.request_id, None) is not None:
            self.waiting.appendleft(seq)
        log.info("preempted %s: no free KV block (%d held by it now copied out)", seq.request_id, len(seq.swapped))
