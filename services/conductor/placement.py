"""Placement: which prefill and which decode instance take a request, from which prefix, or a rejection.
Pure: data in, data out; the conductor service and `tsukimi sim serve` run this same code.

Policies (for comparison; `mooncake` is the default):
- `random`, `round-robin`: ignore load and cache;
- `least-loaded`: shortest predicted prefill queue, lightest decode batch;
- `local-cache`: smallest predicted TTFT using only the prefix each prefill instance holds itself;
- `mooncake`: the paper's Algorithm 1: per prefill instance, its own prefix or, when the best prefix anywhere is
  longer by more than the balancing threshold and fetching it is faster than computing it, that one plus its
  transfer time; TTFT = transfer + queue + prefill; the decode instance with the lowest predicted TBT that has
  room. The instance that fetches a remote prefix keeps it (hot prefixes spread by themselves);
- `colocated`: the vLLM-style baseline (`tsukimi up --colocated`): prefill and decode on the same colocated
  pair (a prefill instance and the decode instance it names in `colocated_with`), the least loaded one: fewest
  requests placed there and not finished (what vLLM instances behind a load balancer get), then the shortest
  prefill queue; each instance reuses only its own prefix cache (no fetching, no alternates).

Rejection: `none`; `early` (the chosen pair's predicted TTFT or current-load TBT misses its SLO); `predicted`
(TBT predicted for the moment the request reaches decode, from the requests already headed there and those
expected to have finished by then: the paper's fix for the two pools' anti-phase oscillation). The TTFT a request
is refused on counts its own prefill at no more than a linear extrapolation past the instance's measured range
(`CostModel.bounded_prefill_s`): never a refusal on the quadratic term far beyond what was timed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tsukimi.conductor.cluster import DecodeEntry, DecodeInstance, PrefillInstance

POLICIES = ("random", "round-robin", "least-loaded", "local-cache", "mooncake")
# Every policy the conductor runs: the disaggregated ones (which `tsukimi sim serve` compares) and `colocated`.
ALL_POLICIES = POLICIES + ("colocated",)
REJECTIONS = ("none", "early", "predicted")


@dataclass(frozen=True)
class PlacementConfig:
    """Settings of the placement policy."""

    policy: str = "mooncake"
    rejection: str = "predicted"
    # Tokens per cache block (the unit of prefix reuse).
    block_tokens: int = 512
    # A remote prefix is fetched only when longer than the local one by more than this many blocks.
    balance_threshold_blocks: int = 2
    # Bytes per second of a KV transfer between instances.
    transfer_bytes_per_s: float = 25e9
    # True when prefill streams the KV to decode layer by layer while it computes (only the part the compute
    # does not hide delays the decode); False: the whole KV moves after the prefill.
    is_kv_streamed: bool = False
    # SLOs in seconds.
    ttft_slo_s: float = 30.0
    tbt_slo_s: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.policy not in ALL_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; one of {', '.join(ALL_POLICIES)}")
        if self.rejection not in REJECTIONS:
            raise ValueError(f"unknown rejection {self.rejection!r}; one of {', '.join(REJECTIONS)}")


@dataclass(frozen=True)
class Request:
    """What placement needs to know of a request."""

    request_id: str
    num_prompt_tokens: int
    # Tokens it is expected to generate (max_tokens, or a prediction).
    num_output_tokens: int
    # Leading block keys of the prompt (full blocks).
    block_keys: tuple = ()
    # Seconds it already waited for decode room (in the conductor's queue): they count toward its TTFT.
    waited_s: float = 0.0


@dataclass
class Decision:
    """Where a request goes (or why not), with the predictions it was made on."""

    prefill_id: str = ""
    decode_id: str = ""
    # Blocks of prefix the prefill instance reuses, and the instance it fetches them from ("" = its own).
    num_reused_blocks: int = 0
    fetch_from: str = ""
    predicted_ttft_s: float = 0.0
    # The TTFT a refusal is judged on: `predicted_ttft_s` with the request's own prefill bounded by the measured
    # range (`CostModel.bounded_prefill_s`); equal to it within the range.
    judged_ttft_s: float = 0.0
    predicted_tbt_s: float = 0.0
    # Predicted seconds of the prefill itself, of the KV fetch before it, and of the KV hand-over to decode
    # after it.
    predicted_prefill_s: float = 0.0
    predicted_transfer_s: float = 0.0
    predicted_handover_s: float = 0.0
    # Set when rejected: "ttft_slo", "tbt_slo", "decode_full" (no batch slot or KV room now: worth waiting for),
    # "kv_too_large" (its whole KV exceeds every decode instance's arena), "no_capacity" (no instances at all).
    rejected: str = ""
    # Other prefill candidates, best first (for retries when the first does not answer).
    alternates: list[str] = field(default_factory=list)

    @property
    def is_rejected(self) -> bool:
        return bool(self.rejected)


class Placer:
    """Chooses instances for requests; keeps the round-robin cursor and random stream."""

    def __init__(self, config: PlacementConfig):
        self.config = config
        self._rng = random.Random(config.seed)
        self._cursor = 0

    def place(self, request: Request, now: float, prefills: list[PrefillInstance],
              decodes: list[DecodeInstance], holdings: dict[str, int]) -> Decision:
        """A decision for `request` at `now`. `holdings` maps prefill instance id -> how many leading blocks of
        the request it holds (instances holding none may be missing)."""
        if not prefills or not decodes:
            return Decision(rejected="no_capacity")
        context = request.num_prompt_tokens + request.num_output_tokens
        if not any(d.can_ever_fit(context) for d in decodes):
            return Decision(rejected="kv_too_large")
        cfg = self.config
        if cfg.policy == "colocated":
            pair = self._choose_pair(request, now, prefills, decodes, holdings)
            if pair is None:
                return Decision(rejected="no_capacity")
            (chosen, decode), reused = pair
            ranked, source, transfer_s, prefill_s = [chosen], "", 0.0, self._estimate(request, chosen, reused)
        else:
            prefill_choice = self._choose_prefill(request, now, prefills, holdings)
            ranked, reused, source, transfer_s, prefill_s = prefill_choice
            chosen = ranked[0]
        ttft = transfer_s + chosen.queue_s(now) + prefill_s
        judged_ttft = ttft - prefill_s + self._bounded_estimate(request, chosen, reused)
        handover_s = request.num_prompt_tokens * chosen.cost.kv_bytes_per_token / cfg.transfer_bytes_per_s
        if cfg.is_kv_streamed:
            handover_s = max(0.0, handover_s - prefill_s)
        arrival = now + ttft + handover_s
        if cfg.policy != "colocated":
            decode = self._choose_decode(arrival, context, decodes, now)
        elif cfg.rejection != "none" and not decode.can_fit(arrival, context):
            decode = None
        if decode is None:
            # NOTE: a request that would miss its TTFT anyway is not worth waiting for room.
            late = judged_ttft + request.waited_s > cfg.ttft_slo_s
            return Decision(rejected="ttft_slo" if late else "decode_full", predicted_ttft_s=ttft,
                            judged_ttft_s=judged_ttft)
        tbt = decode.tbt_with(arrival, context)
        decision = Decision(prefill_id=chosen.instance_id, decode_id=decode.instance_id,
                            num_reused_blocks=reused, fetch_from=source, predicted_ttft_s=ttft,
                            judged_ttft_s=judged_ttft,
                            predicted_tbt_s=tbt, predicted_prefill_s=prefill_s, predicted_transfer_s=transfer_s,
                            predicted_handover_s=handover_s, alternates=[p.instance_id for p in ranked[1:]])
        if cfg.rejection != "none":
            # NOTE: `early` judges the decode load of now, `predicted` the load when the request gets there.
            judged_tbt = decode.tbt_with(now, context) if cfg.rejection == "early" else tbt
            if judged_ttft + request.waited_s > cfg.ttft_slo_s:
                decision.rejected = "ttft_slo"
            elif judged_tbt > cfg.tbt_slo_s:
                decision.rejected = "tbt_slo"
        return decision

    def commit(self, request: Request, decision: Decision, now: float, prefills: dict[str, PrefillInstance],
               decodes: dict[str, DecodeInstance]) -> None:
        """Books an accepted decision into the instances' predicted load."""
        prefill = prefills[decision.prefill_id]
        done = prefill.enqueue(now, decision.predicted_transfer_s + decision.predicted_prefill_s)
        if request.num_output_tokens <= 1:
            return  # NOTE: prefill's token is the whole answer: nothing runs on decode.
        decode = decodes[decision.decode_id]
        context = request.num_prompt_tokens + request.num_output_tokens
        steps = request.num_output_tokens - 1
        start = done + decision.predicted_handover_s
        decode.add(request.request_id, DecodeEntry(context, start, start + steps * decision.predicted_tbt_s))

    # ---- internals ---------------------------------------------------------------------------------------

    def _reused_tokens(self, request: Request, num_blocks: int) -> int:
        # NOTE: at least one prompt token is always computed (it yields the first output token).
        return min(num_blocks * self.config.block_tokens, request.num_prompt_tokens - 1)

    def _estimate(self, request: Request, p: PrefillInstance, num_blocks: int) -> float:
        reused = self._reused_tokens(request, num_blocks)
        return p.cost.prefill_s(request.num_prompt_tokens - reused, reused)

    def _bounded_estimate(self, request: Request, p: PrefillInstance, num_blocks: int) -> float:
        reused = self._reused_tokens(request, num_blocks)
        return p.cost.bounded_prefill_s(request.num_prompt_tokens - reused, reused)

    def _choose_prefill(self, request: Request, now: float, prefills: list[PrefillInstance],
                        holdings: dict[str, int]):
        """(instances best first, reused blocks, fetch source, transfer s, prefill s) for the first."""
        cfg = self.config
        policy = cfg.policy
        if policy in ("random", "round-robin", "least-loaded"):
            if policy == "random":
                first = self._rng.randrange(len(prefills))
                ranked = prefills[first:] + prefills[:first]
            elif policy == "round-robin":
                first = self._cursor % len(prefills)
                self._cursor += 1
                ranked = prefills[first:] + prefills[:first]
            else:
                ranked = sorted(prefills, key=lambda p: (p.queue_s(now), p.instance_id))
            # NOTE: these policies still reuse whatever prefix the chosen instance holds itself.
            own = holdings.get(ranked[0].instance_id, 0)
            return ranked, own, "", 0.0, self._estimate(request, ranked[0], own)
        best_id, best = max(holdings.items(), key=lambda kv: (kv[1], kv[0]), default=("", 0))
        scored = []
        # NOTE: instances share cost models and hosts share prefixes: each (model, own prefix) is worked out once.
        options: dict[tuple[int, int], tuple[int, str, float, float]] = {}
        for p in prefills:
            own = holdings.get(p.instance_id, 0)
            option = options.get((id(p.cost), own))
            if option is None:
                reused, source, transfer_s = own, "", 0.0
                prefill_s = self._estimate(request, p, own)
                if policy == "mooncake" and best - own > cfg.balance_threshold_blocks:
                    extra_tokens = self._reused_tokens(request, best) - self._reused_tokens(request, own)
                    fetch_s = extra_tokens * p.cost.kv_bytes_per_token / cfg.transfer_bytes_per_s
                    remote_prefill_s = self._estimate(request, p, best)
                    if fetch_s + remote_prefill_s < prefill_s:
                        reused, source, transfer_s, prefill_s = best, best_id, fetch_s, remote_prefill_s
                option = options[(id(p.cost), own)] = (reused, source, transfer_s, prefill_s)
            reused, source, transfer_s, prefill_s = option
            scored.append((transfer_s + p.queue_s(now) + prefill_s, p.instance_id, p, reused, source, transfer_s,
                           prefill_s))
        scored.sort(key=lambda s: (s[0], s[1]))
        _, _, p, reused, source, transfer_s, prefill_s = scored[0]
        return [s[2] for s in scored], reused, source, transfer_s, prefill_s

    def _choose_pair(self, request: Request, now: float, prefills: list[PrefillInstance],
                     decodes: list[DecodeInstance], holdings: dict[str, int]):
        """((prefill, decode) of the least loaded colocated pair, blocks its prefill reuses), or None when no
        prefill instance has its colocated decode instance live."""
        by_id = {d.instance_id: d for d in decodes}
        pairs = [(p, by_id[p.colocated_with]) for p in prefills if p.colocated_with in by_id]
        if not pairs:
            return None
        pair = min(pairs, key=lambda pd: (len(pd[1].entries), pd[0].queue_s(now), pd[0].instance_id))
        return pair, holdings.get(pair[0].instance_id, 0)

    def _choose_decode(self, arrival: float, context: int, decodes: list[DecodeInstance], now: float
                       ) -> DecodeInstance | None:
        """The decode instance with room when the request arrives (and now, under `early`) and the lowest
        predicted TBT then; None when none has room and rejection is on."""
        policy = self.config.policy
        fitting = [d for d in decodes if d.can_fit(arrival, context)
                   and (self.config.rejection != "early" or d.can_fit(now, context))]
        if not fitting:
            if self.config.rejection != "none":
                return None
            fitting = decodes  # NOTE: without rejection the request waits for room in the decode batch.
        if policy == "random":
            return self._rng.choice(fitting)
        if policy == "round-robin":
            return fitting[(self._cursor - 1) % len(fitting)]
        if policy == "least-loaded":
            return min(fitting, key=lambda d: (len(d.entries), d.instance_id))
        return min(fitting, key=lambda d: (d.tbt_with(arrival, context), d.instance_id))
