"""The disaggregated cluster of `tsukimi sim serve`: prefill nodes, decode nodes, the conductor's placement.

Arrival: every prefill node's cache is asked (a peek, `num_leading`) how many leading blocks of the request it holds;
the conductor's own `Placer.place` decides on its predicted view (`PrefillInstance`/`DecodeInstance` objects this
simulator keeps up to date); a rejection is recorded and dropped, otherwise `Placer.commit` books it. With
`decode_wait_s`, a request that finds no decode room waits as in the conductor (its `DecodeWaitQueue`, at most
`max_decode_wait` requests), re-tried in order whenever a decode request ends, "decode_full" once its wait is over.

Prefill node: FIFO, one request at a time, for (fetch of the remote prefix) + `cost.prefill_s(new, reused)` with the
decision's reused blocks, leased (pinned in their caches) from the decision to the prefill's start as the pool leases
blocks to a reader, so the prediction holds. At its end the first token is out; the node's cache (an `LruBlockIndex`
of `cache_tokens` tokens, the node's DRAM share of the pool) touches the reused blocks and stores the rest, fetched
ones included (hot prefixes spread); the KV then moves to the decode node (prompt tokens x KV bytes per token /
transfer bandwidth; with `overlap_kv`, streamed layer by layer during the prefill, so only what the compute did not
hide remains).

Decode node: continuous batching. A step takes `cost.decode_step_s(batch, context tokens)`; every sequence in it
gains a token; arrivals join at the next step (if the batch and the KV memory have room); a request leaves with its
last token and is `finish`ed in the conductor's view.

View refresh (`view_refresh_s` > 0, off by default, as in the conductor today): every so often each decode node
re-books its requests in the conductor's view from their real progress (running: remaining tokens x the current
step time from now; waiting for room: starting now), the per-request heartbeat the conductor would need for its
predicted decode load not to drift when the real steps are slower than predicted.
"""

from __future__ import annotations

from collections import deque

from tsukimi.cachestore.lru_index import LruBlockIndex, TierFull
from tsukimi.common.cost_model import CostModel
from tsukimi.conductor.cluster import DecodeEntry, DecodeInstance, PrefillInstance
from tsukimi.conductor.decode_wait import DecodeWaitQueue
from tsukimi.conductor.placement import PlacementConfig, Placer, Request
from tsukimi.sim.clock import Clock
from tsukimi.sim.workload import SimRequest


class PrefillNode:
    __slots__ = ("view", "cache", "queue", "busy", "queued_predicted_s")

    def __init__(self, view: PrefillInstance, cache: LruBlockIndex):
        self.view = view
        self.cache = cache
        # (request, predicted seconds) in arrival order; the head is running while `busy`.
        self.queue: deque = deque()
        self.busy = False
        self.queued_predicted_s = 0.0


class DecodeNode:
    __slots__ = ("view", "pending", "running", "batch", "context", "reserved", "steps", "finishing", "busy")

    def __init__(self, view: DecodeInstance):
        self.view = view
        # Requests whose KV has arrived, waiting for the next step (or for room).
        self.pending: deque = deque()
        self.running: dict[str, SimRequest] = {}
        self.batch = 0
        # KV tokens held now by the batch, and at most by the end (prompt + output of each).
        self.context = 0
        self.reserved = 0
        # End time of every step so far (the batch's token times).
        self.steps: list[float] = []
        # Step index -> requests whose last token that step makes.
        self.finishing: dict[int, list[SimRequest]] = {}
        self.busy = False


class DisaggregatedSim:
    """Prefill and decode pools under the conductor's placement and the pool's cache index."""

    def __init__(self, cost: CostModel, num_prefill: int, num_decode: int, config: PlacementConfig,
                 cache_tokens: int, max_batch_size: int, kv_tokens: int, overlap_kv: bool = False,
                 view_refresh_s: float = 0.0, sample_every_s: float = 0.0, high_watermark: float = 0.9,
                 evict_share: float = 0.05, decode_wait_s: float = 0.0, max_decode_wait: int = 128):
        if num_prefill <= 0 or num_decode <= 0:
            raise ValueError("need at least one prefill and one decode node")
        self.cost = cost
        self.config = config
        self.placer = Placer(config)
        self.overlap_kv = overlap_kv
        self.block_tokens = config.block_tokens
        self.prefill_nodes = [PrefillNode(PrefillInstance(f"prefill-{i:02d}", cost),
                                          LruBlockIndex(int(cache_tokens), high_watermark, evict_share))
                              for i in range(num_prefill)]
        self.decode_nodes = [DecodeNode(DecodeInstance(f"decode-{i:02d}", cost, max_batch_size, int(kv_tokens)))
                             for i in range(num_decode)]
        self.prefill_views = [n.view for n in self.prefill_nodes]
        self.decode_views = [n.view for n in self.decode_nodes]
        self.prefill_view_by_id = {n.view.instance_id: n.view for n in self.prefill_nodes}
        self.decode_view_by_id = {n.view.instance_id: n.view for n in self.decode_nodes}
        self.prefill_by_id = {n.view.instance_id: n for n in self.prefill_nodes}
        self.decode_by_id = {n.view.instance_id: n for n in self.decode_nodes}
        self.clock = Clock(sample_every_s, self._sample)
        self.reuse_lost_blocks = 0
        self.view_refresh_s = view_refresh_s
        # Requests neither rejected nor done yet.
        self._unresolved = 0
        # Requests waiting for decode room (the conductor's queue).
        self.waiting: DecodeWaitQueue[SimRequest] = DecodeWaitQueue(max_decode_wait, decode_wait_s)
        self.num_waited = 0

    def run(self, requests: list[SimRequest]) -> None:
        for r in requests:
            self.clock.at(r.arrival, self._arrive, r)
        self._unresolved = len(requests)
        if self.view_refresh_s > 0 and requests:
            self.clock.at(self.view_refresh_s, self._refresh_views)
        self.clock.run()

    def counters(self) -> dict:
        return {"reuse_lost_blocks": self.reuse_lost_blocks,
                "evictions": sum(n.cache.num_evictions for n in self.prefill_nodes),
                "decode_steps": sum(len(n.steps) for n in self.decode_nodes),
                "decode_waits": self.num_waited,
                "events": self.clock.num_events}

    # ---- events ------------------------------------------------------------------------------------------

    def _arrive(self, t: float, r: SimRequest) -> None:
        if not self._place(t, r, 0.0) and self.waiting.push(r.request_id, r, t):
            self.num_waited += 1
            self.clock.at(t + self.waiting.wait_s, self._wait_over, r)

    def _wait_over(self, t: float, r: SimRequest) -> None:
        if self.waiting.remove(r.request_id) is not None:
            self._reject(r, "decode_full")

    def _retry_waiting(self, t: float) -> None:
        for key, waiter in self.waiting.waiting():
            if self._place(t, waiter.item, t - waiter.since, is_waiting=True):
                self.waiting.remove(key)

    def _reject(self, r: SimRequest, reason: str) -> None:
        r.rejected = reason
        self._unresolved -= 1

    def _place(self, t: float, r: SimRequest, waited_s: float, is_waiting: bool = False) -> bool:
        """Places `r` (True), rejects it (True, recorded) or leaves it to wait for decode room (False)."""
        keys = r.keys
        holdings = {}
        for node in self.prefill_nodes:
            n = node.cache.num_leading(keys)
            if n:
                holdings[node.view.instance_id] = n
        request = Request(r.request_id, r.num_prompt_tokens, r.num_output_tokens, keys, waited_s=waited_s)
        decision = self.placer.place(request, t, self.prefill_views, self.decode_views, holdings)
        if decision.rejected == "decode_full" and (is_waiting or self.waiting.can_wait()):
            return False
        if decision.is_rejected:
            self._reject(r, decision.rejected)
            return True
        self.placer.commit(request, decision, t, self.prefill_view_by_id, self.decode_view_by_id)
        node = self.prefill_by_id[decision.prefill_id]
        # The blocks it will reuse are leased (pinned) until its prefill starts, as the pool leases a reader's.
        blocks = decision.num_reused_blocks
        leases = []
        own = min(holdings.get(decision.prefill_id, 0), blocks)
        if own:
            leases.append((node.cache, keys[:own]))
        if decision.fetch_from:
            leases.append((self.prefill_by_id[decision.fetch_from].cache, keys[:blocks]))
        for cache, leased in leases:
            for key in leased:
                cache.pin(key)
        r.extra = (decision, leases)
        predicted = decision.predicted_transfer_s + decision.predicted_prefill_s
        node.queue.append((r, predicted))
        node.queued_predicted_s += predicted
        if not node.busy:
            self._start_prefill(t, node)
        return True

    def _reusable(self, r: SimRequest, blocks: int) -> int:
        return min(blocks * self.block_tokens, r.num_prompt_tokens - 1) if blocks else 0

    def _start_prefill(self, t: float, node: PrefillNode) -> None:
        r = node.queue[0][0]
        decision, leases = r.extra
        for cache, leased in leases:
            for key in leased:
                cache.unpin(key)
        blocks = decision.num_reused_blocks
        keys = r.keys[:blocks]
        own = node.cache.match_prefix(keys)  # reads refresh the LRU order
        if decision.fetch_from:
            usable = max(own, self.prefill_by_id[decision.fetch_from].cache.match_prefix(keys))
        else:
            usable = own
        # NOTE: leased blocks stay, so this stays 0 (kept as a check of the leases).
        self.reuse_lost_blocks += blocks - min(blocks, usable)
        blocks = min(blocks, usable)
        reused = self._reusable(r, blocks)
        fetched = reused - self._reusable(r, min(own, blocks))
        cost = self.cost
        r.reused_tokens = reused
        r.fetched_tokens = fetched
        r.prefill_s = cost.prefill_s(r.num_prompt_tokens - reused, reused)
        transfer_s = fetched * cost.kv_bytes_per_token / self.config.transfer_bytes_per_s
        node.busy = True
        self.clock.at(t + transfer_s + r.prefill_s, self._prefill_done, node)

    def _prefill_done(self, t: float, node: PrefillNode) -> None:
        r, predicted = node.queue.popleft()
        view = node.view
        view.num_queued -= 1
        node.queued_predicted_s = node.queued_predicted_s - predicted if node.queue else 0.0
        view.busy_until = t + node.queued_predicted_s  # the conductor learns the real finish
        r.first_token_at = t
        cache = node.cache
        n = cache.match_prefix(r.keys)
        try:
            for key in r.keys[n:]:
                cache.insert(key, self.block_tokens)
        except TierFull:
            pass  # NOTE: a prompt larger than the node's whole cache keeps what fits.
        decision = r.extra[0]
        r.extra = None
        if r.num_output_tokens <= 1:
            r.done_at = t
            self._unresolved -= 1
            self.decode_view_by_id[decision.decode_id].finish(r.request_id)
        else:
            cost = self.cost
            delay = r.num_prompt_tokens * cost.kv_bytes_per_token / self.config.transfer_bytes_per_s
            if self.overlap_kv:
                delay = max(0.0, delay - r.prefill_s)
            self.clock.at(t + delay, self._kv_arrive, (self.decode_by_id[decision.decode_id], r))
        if node.queue:
            self._start_prefill(t, node)
        else:
            node.busy = False

    def _kv_arrive(self, t: float, arg) -> None:
        node, r = arg
        node.pending.append(r)
        if not node.busy:
            self._decode_step(t, node)

    def _decode_step(self, t: float, node: DecodeNode) -> None:
        pending = node.pending
        view = node.view
        while pending:
            r = pending[0]
            need = r.num_prompt_tokens + r.num_output_tokens
            if node.batch and (node.batch >= view.max_batch_size or node.reserved + need > view.num_kv_tokens):
                break
            pending.popleft()
            k = len(node.steps)
            r.token_log = node.steps
            r.first_step = k
            last = k + r.num_output_tokens - 2
            if last in node.finishing:
                node.finishing[last].append(r)
            else:
                node.finishing[last] = [r]
            node.running[r.request_id] = r
            node.batch += 1
            node.context += r.num_prompt_tokens + 1
            node.reserved += need
        if not node.batch:
            node.busy = False
            return
        node.busy = True
        self.clock.at(t + self.cost.decode_step_s(node.batch, node.context), self._decode_step_done, node)

    def _decode_step_done(self, t: float, node: DecodeNode) -> None:
        node.context += node.batch
        done = node.finishing.pop(len(node.steps), None)
        node.steps.append(t)
        if done:
            for r in done:
                node.batch -= 1
                total = r.num_prompt_tokens + r.num_output_tokens
                node.context -= total
                node.reserved -= total
                node.view.finish(r.request_id)
                del node.running[r.request_id]
                r.done_at = t
                self._unresolved -= 1
            if len(self.waiting):
                self._retry_waiting(t)
        self._decode_step(t, node)

    def _refresh_views(self, t: float, _) -> None:
        for node in self.decode_nodes:
            view = node.view
            step_s = self.cost.decode_step_s(max(1, node.batch), node.context)
            done = len(node.steps)
            for rid, r in node.running.items():
                left = r.num_output_tokens - (done - r.first_step + 1)
                view.add(rid, DecodeEntry(r.num_prompt_tokens + r.num_output_tokens,
                                          min(view.entries[rid].start_at, t), t + left * step_s))
            for r in node.pending:
                view.add(r.request_id, DecodeEntry(r.num_prompt_tokens + r.num_output_tokens, t,
                                                   t + (r.num_output_tokens - 1) * step_s))
        if self._unresolved > 0:
            self.clock.at(t + self.view_refresh_s, self._refresh_views)

    def _sample(self) -> tuple:
        """(prefill requests queued or running, decode batch, decode requests waiting for room or a step)."""
        return (sum(len(n.queue) for n in self.prefill_nodes), sum(n.batch for n in self.decode_nodes),
                sum(len(n.pending) for n in self.decode_nodes))
