"""The colocated baseline of `tsukimi sim serve` (vLLM-style): every instance does both prefill and decode, no pool,
no KV transfer.

Placement: the instance with the fewest requests waiting or running (what vLLM instances behind a load balancer
get); early rejection, if asked, refuses a request whose predicted TTFT (the instance's predicted prefill backlog +
its own prefill) or TBT (one decode step with it added, at the batch's final context) misses its SLO. `predicted`
rejection is the same here: with no separate decode pool there is no later moment to predict.

An instance steps:
- whole prefill (default): if a request waits and fits in memory, the step is its whole prefill, which stalls the
  running batch for that long (colocation's TBT hit); otherwise a decode step of the batch;
- chunked prefill (`chunk_tokens`): each step is a decode step of the batch plus up to `chunk_tokens` prompt
  tokens of the waiting requests, FIFO; a chunk costs `prefill_s(chunk, tokens already done + reused)` (one forward:
  the fixed prefill cost counted once per step).
A request's first token is out at the end of the step that finishes its prompt; it decodes from the next step.
With a prefix cache (`cache_tokens`, vLLM's automatic prefix caching) the leading cached blocks are not recomputed.
Memory: a request is admitted to prefill only if the batch and the KV memory have room for its final context.
"""

from __future__ import annotations

from collections import deque

from tsukimi.cachestore.lru_index import LruBlockIndex, TierFull
from tsukimi.common.cost_model import CostModel
from tsukimi.sim.clock import Clock
from tsukimi.sim.workload import SimRequest


class Instance:
    __slots__ = ("index", "waiting", "batch", "context", "reserved", "admitted", "tokens", "finishing", "busy",
                 "cache", "num_requests", "backlog_s", "step_batch", "step_prefills")

    def __init__(self, index: int, cache: LruBlockIndex | None):
        self.index = index
        self.cache = cache
        # Requests not yet fully prefilled, FIFO (the head may be part-way through, chunked).
        self.waiting: deque = deque()
        self.batch = 0
        self.context = 0
        # Final context of the requests holding memory (prefilling or decoding), and how many.
        self.reserved = 0
        self.admitted = 0
        # End times of the steps that made a token for the batch.
        self.tokens: list[float] = []
        self.finishing: dict[int, list[SimRequest]] = {}
        self.busy = False
        # Accepted, not finished (waiting + running): the load balancer's measure.
        self.num_requests = 0
        # Predicted seconds of prefill accepted and not done.
        self.backlog_s = 0.0
        self.step_batch = 0
        self.step_prefills: list[SimRequest] = []


class ColocatedSim:
    """N instances each doing prefill and decode."""

    def __init__(self, cost: CostModel, num_instances: int, max_batch_size: int, kv_tokens: int,
                 chunk_tokens: int = 0, cache_tokens: int = 0, rejection: str = "none", ttft_slo_s: float = 30.0,
                 tbt_slo_s: float = 0.1, block_tokens: int = 512, sample_every_s: float = 0.0,
                 high_watermark: float = 0.9, evict_share: float = 0.05):
        if num_instances <= 0:
            raise ValueError("need at least one instance")
        self.cost = cost
        self.max_batch_size = max_batch_size
        self.kv_tokens = int(kv_tokens)
        self.chunk_tokens = chunk_tokens
        self.rejection = rejection
        self.ttft_slo_s = ttft_slo_s
        self.tbt_slo_s = tbt_slo_s
        self.block_tokens = block_tokens
        self.instances = [Instance(i, LruBlockIndex(int(cache_tokens), high_watermark, evict_share)
                                   if cache_tokens else None) for i in range(num_instances)]
        self.clock = Clock(sample_every_s, self._sample)

    def run(self, requests: list[SimRequest]) -> None:
        for r in requests:
            self.clock.at(r.arrival, self._arrive, r)
        self.clock.run()

    def counters(self) -> dict:
        return {"evictions": sum(i.cache.num_evictions for i in self.instances if i.cache),
                "token_steps": sum(len(i.tokens) for i in self.instances), "events": self.clock.num_events}

    def _reusable(self, r: SimRequest, cache: LruBlockIndex | None, touch: bool) -> int:
        if cache is None:
            return 0
        blocks = cache.match_prefix(r.keys) if touch else cache.num_leading(r.keys)
        return min(blocks * self.block_tokens, r.num_prompt_tokens - 1) if blocks else 0

    # ---- events ------------------------------------------------------------------------------------------

    def _arrive(self, t: float, r: SimRequest) -> None:
        inst = min(self.instances, key=lambda i: (i.num_requests, i.index))
        reused = self._reusable(r, inst.cache, touch=False)
        predicted = self.cost.prefill_s(r.num_prompt_tokens - reused, reused)
        if self.rejection != "none":
            if inst.backlog_s + predicted > self.ttft_slo_s:
                r.rejected = "ttft_slo"
                return
            tbt = self.cost.decode_step_s(inst.admitted + 1,
                                          inst.reserved + r.num_prompt_tokens + r.num_output_tokens)
            if tbt > self.tbt_slo_s:
                r.rejected = "tbt_slo"
                return
        inst.num_requests += 1
        inst.backlog_s += predicted
        r.extra = [predicted, False, 0]  # predicted prefill s, started, prompt tokens done
        inst.waiting.append(r)
        if not inst.busy:
            self._step(t, inst)

    def _fits(self, inst: Instance, r: SimRequest) -> bool:
        return not inst.admitted or (inst.admitted < self.max_batch_size
                                     and inst.reserved + r.num_prompt_tokens + r.num_output_tokens <= self.kv_tokens)

    def _begin_prefill(self, inst: Instance, r: SimRequest) -> None:
        r.reused_tokens = self._reusable(r, inst.cache, touch=True)
        r.extra[1] = True
        r.extra[2] = r.reused_tokens
        inst.reserved += r.num_prompt_tokens + r.num_output_tokens
        inst.admitted += 1

    def _step(self, t: float, inst: Instance) -> None:
        cost = self.cost
        waiting = inst.waiting
        prefills: list[SimRequest] = []
        seconds = 0.0
        inst.step_batch = 0
        if not self.chunk_tokens:
            if waiting and self._fits(inst, waiting[0]):
                r = waiting.popleft()
                self._begin_prefill(inst, r)
                r.prefill_s = cost.prefill_s(r.num_prompt_tokens - r.reused_tokens, r.reused_tokens)
                prefills.append(r)
                seconds = r.prefill_s  # the running batch waits: no token for it this step
            elif inst.batch:
                inst.step_batch = inst.batch
                seconds = cost.decode_step_s(inst.batch, inst.context)
        else:
            budget = self.chunk_tokens
            first = True
            while waiting and budget > 0:
                r = waiting[0]
                state = r.extra
                if not state[1]:
                    if not self._fits(inst, r):
                        break
                    self._begin_prefill(inst, r)
                done = state[2]
                piece = min(budget, r.num_prompt_tokens - done)
                chunk_s = cost.prefill_s(piece, done) - (0.0 if first else cost.prefill_base_s)
                first = False
                r.prefill_s += chunk_s
                seconds += chunk_s
                state[2] = done + piece
                budget -= piece
                if state[2] < r.num_prompt_tokens:
                    break
                waiting.popleft()
                prefills.append(r)
            inst.step_batch = inst.batch
            if inst.batch:
                seconds += cost.decode_step_s(inst.batch, inst.context)
        if not prefills and not inst.step_batch and not seconds:
            inst.busy = False
            return
        inst.step_prefills = prefills
        inst.busy = True
        self.clock.at(t + seconds, self._step_done, inst)

    def _step_done(self, t: float, inst: Instance) -> None:
        if inst.step_batch:
            inst.context += inst.step_batch
            done = inst.finishing.pop(len(inst.tokens), None)
            inst.tokens.append(t)
            if done:
                for r in done:
                    total = r.num_prompt_tokens + r.num_output_tokens
                    inst.batch -= 1
                    inst.context -= total
                    self._release(t, inst, r)
        for r in inst.step_prefills:
            r.first_token_at = t
            inst.backlog_s -= r.extra[0]
            r.extra = None
            if inst.cache is not None:
                n = inst.cache.match_prefix(r.keys)
                try:
                    for key in r.keys[n:]:
                        inst.cache.insert(key, self.block_tokens)
                except TierFull:
                    pass
            if r.num_output_tokens <= 1:
                self._release(t, inst, r)
                continue
            k = len(inst.tokens)
            r.token_log = inst.tokens
            r.first_step = k
            last = k + r.num_output_tokens - 2
            if last in inst.finishing:
                inst.finishing[last].append(r)
            else:
                inst.finishing[last] = [r]
            inst.batch += 1
            inst.context += r.num_prompt_tokens + 1
        if not inst.waiting:
            inst.backlog_s = 0.0
        self._step(t, inst)

    def _release(self, t: float, inst: Instance, r: SimRequest) -> None:
        inst.reserved -= r.num_prompt_tokens + r.num_output_tokens
        inst.admitted -= 1
        inst.num_requests -= 1
        r.done_at = t

    def _sample(self) -> tuple:
        """(requests waiting for prefill, decode batch, 0)."""
        return (sum(len(i.waiting) for i in self.instances), sum(i.batch for i in self.instances), 0)
