"""`tsukimi sim serve`: a discrete-event simulation of the whole serving system replaying a Mooncake-format trace
at its timestamps, through the conductor's own placement and rejection code (`tsukimi.conductor.placement`) and the
pool's own cache index (`tsukimi.cachestore.lru_index`), on instances whose times come from a `CostModel`.

Systems:
- disaggregated (default): `--prefill N --decode M` (see `tsukimi.sim.disaggregated`);
- colocated (`--colocated`): N + M instances each doing both, vLLM-style, optionally with chunked prefill and a
  local prefix cache (see `tsukimi.sim.colocated`).

Measured as the paper does (see `tsukimi.sim.outcome`): TTFT, TBT (mean of the longest 10% gaps), effective request
capacity (share of all requests meeting both SLOs). `--compare` runs several systems, policies or rejection modes in
one command and draws them in one figure.

Defaults and where they come from:
- cost model `roofline("llama3-70b", "a800", 8)`: the paper's setting, LLaMA3-70B on a node of 8 A800;
- `--cache-tokens-per-node 3e6`: the paper's "~3M tokens per node" of DRAM pool (section 5);
- `--kv-tokens-per-instance 1.3e6`: HBM left for KV on 8 x 80 GB after the bf16 weights and 10% headroom
  (0.9 x 640 GB - 141 GB) / 320 KiB per token; `--max-batch 256` (vLLM's default max_num_seqs); the colocated
  prefix cache (vLLM's, in HBM) gets the same capacity;
- transfer bandwidth and balancing threshold: `PlacementConfig`'s defaults (25 GB/s, 2 blocks);
- the conductor is told each request's true output length (as if max_tokens were exact).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import msgspec
import numpy as np

from tsukimi.common.cost_model import CostModel, roofline
from tsukimi.conductor.placement import POLICIES, REJECTIONS, PlacementConfig
from tsukimi.sim.cache import load_trace
from tsukimi.sim.colocated import ColocatedSim
from tsukimi.sim.disaggregated import DisaggregatedSim
from tsukimi.sim.outcome import capacity_curve, per_request, summarize
from tsukimi.sim.workload import requests_from_trace

BLOCK_TOKENS = 512
DEFAULT_CACHE_TOKENS = 3_000_000
DEFAULT_KV_TOKENS = 1_300_000
DEFAULT_MAX_BATCH = 256
DEFAULT_CHUNK_TOKENS = 2048
COMPARE_POLICIES = ("mooncake", "local-cache", "least-loaded", "random")


@dataclass(frozen=True)
class ServeConfig:
    """One simulated system."""

    colocated: bool = False
    prefill: int = 8
    decode: int = 8
    policy: str = "mooncake"
    rejection: str = "none"
    chunked_prefill: int = 0
    local_prefix_cache: bool = False
    cache_tokens_per_node: float = DEFAULT_CACHE_TOKENS
    kv_tokens_per_instance: float = DEFAULT_KV_TOKENS
    max_batch: int = DEFAULT_MAX_BATCH
    ttft_slo_s: float = 30.0
    tbt_slo_s: float = 0.1
    rate_scale: float = 1.0
    transfer_bytes_per_s: float = 25e9
    balance_threshold_blocks: int = 2
    overlap_kv: bool = False
    view_refresh_s: float = 0.0
    # Disaggregated: seconds a request with no decode room waits for it (as in the conductor); 0: rejected at once.
    decode_wait_s: float = 0.0
    limit: int = 0
    seed: int = 0
    sample_every_s: float = 2.0
    label: str = ""

    def name(self) -> str:
        if self.label:
            return self.label
        if self.colocated:
            parts = [f"colocated-{self.prefill + self.decode}"]
            if self.local_prefix_cache:
                parts.append("prefix")
            if self.chunked_prefill:
                parts.append(f"chunk{self.chunked_prefill}")
        else:
            parts = [self.policy, f"{self.prefill}p{self.decode}d"]
        parts.append(f"rej-{self.rejection}")
        return "-".join(parts)

    def title(self) -> str:
        if self.colocated:
            extra = (" + prefix cache" if self.local_prefix_cache else "") + (
                f" + chunked prefill {self.chunked_prefill}" if self.chunked_prefill else "")
            system = f"colocated x{self.prefill + self.decode}{extra}"
        else:
            system = f"{self.policy} {self.prefill}P+{self.decode}D"
        return f"{system}, rejection {self.rejection}, rate x{self.rate_scale:g}"


@dataclass
class RunResult:
    summary: dict
    ttft: np.ndarray
    tbt: np.ndarray
    samples: list = field(default_factory=list)
    wall_s: float = 0.0
    # The SimRequests themselves, when asked for (tests, analyses).
    requests: list | None = None


def load_cost_model(spec: str) -> CostModel:
    """`roofline` (the paper's setting), `roofline:<model>/<gpu>[/<n>]`, or a JSON file of CostModel fields."""
    if spec == "roofline":
        return roofline("llama3-70b", "a800", 8)
    if spec.startswith("roofline:"):
        parts = spec.split(":", 1)[1].split("/")
        return roofline(parts[0], parts[1] if len(parts) > 1 else "a800", int(parts[2]) if len(parts) > 2 else 8)
    with open(spec, "rb") as f:
        data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("cost_model"), dict):
        data = data["cost_model"]
    return msgspec.convert(data, CostModel)


def simulate(trace: list[dict], cfg: ServeConfig, cost: CostModel, keep_requests: bool = False) -> RunResult:
    """Runs one system on `trace` (rows of a Mooncake-format trace)."""
    started = time.perf_counter()
    requests = requests_from_trace(trace, cfg.rate_scale, cfg.limit or None)
    if cfg.colocated:
        cache_tokens = cfg.kv_tokens_per_instance if cfg.local_prefix_cache else 0
        system = ColocatedSim(cost, cfg.prefill + cfg.decode, cfg.max_batch, int(cfg.kv_tokens_per_instance),
                              chunk_tokens=cfg.chunked_prefill, cache_tokens=int(cache_tokens),
                              rejection=cfg.rejection, ttft_slo_s=cfg.ttft_slo_s, tbt_slo_s=cfg.tbt_slo_s,
                              block_tokens=BLOCK_TOKENS, sample_every_s=cfg.sample_every_s)
    else:
        placement = PlacementConfig(policy=cfg.policy, rejection=cfg.rejection, block_tokens=BLOCK_TOKENS,
                                    balance_threshold_blocks=cfg.balance_threshold_blocks,
                                    transfer_bytes_per_s=cfg.transfer_bytes_per_s, ttft_slo_s=cfg.ttft_slo_s,
                                    tbt_slo_s=cfg.tbt_slo_s, seed=cfg.seed, is_kv_streamed=cfg.overlap_kv)
        system = DisaggregatedSim(cost, cfg.prefill, cfg.decode, placement, int(cfg.cache_tokens_per_node),
                                  cfg.max_batch, int(cfg.kv_tokens_per_instance), overlap_kv=cfg.overlap_kv,
                                  view_refresh_s=cfg.view_refresh_s, sample_every_s=cfg.sample_every_s,
                                  decode_wait_s=cfg.decode_wait_s)
    system.run(requests)
    ttft, tbt = per_request(requests)
    summary = summarize(requests, cfg.ttft_slo_s, cfg.tbt_slo_s)
    summary["capacity_vs_tbt"] = capacity_curve(ttft, tbt, cfg.ttft_slo_s)
    summary["simulated_s"] = round(system.clock.now, 3)
    summary["counters"] = system.counters()
    summary["config"] = {**asdict(cfg), "system": cfg.name(), "cost_model": cost.source}
    if cfg.colocated:
        for key in ("policy", "balance_threshold_blocks", "transfer_bytes_per_s", "overlap_kv",
                    "cache_tokens_per_node", "view_refresh_s", "decode_wait_s"):
            summary["config"].pop(key)
        summary["config"]["policy"] = "least-requests"
    return RunResult(summary, ttft, tbt, system.clock.samples, time.perf_counter() - started,
                     requests if keep_requests else None)


# ---- comparisons -----------------------------------------------------------------------------------------


def compare_configs(kind: str, base: ServeConfig) -> list[ServeConfig]:
    """The systems one `--compare` runs."""
    if kind == "systems":
        chunk = base.chunked_prefill or DEFAULT_CHUNK_TOKENS
        disagg = replace(base, colocated=False, chunked_prefill=0, local_prefix_cache=False, label="")
        colo = replace(disagg, colocated=True)
        return [replace(disagg, label=f"Mooncake {base.prefill}P+{base.decode}D ({base.policy})"),
                replace(colo, label=f"colocated x{base.prefill + base.decode}"),
                replace(colo, local_prefix_cache=True, label=f"colocated x{base.prefill + base.decode} + prefix cache"),
                replace(colo, chunked_prefill=chunk,
                        label=f"colocated x{base.prefill + base.decode} + chunked prefill {chunk}")]
    if kind == "policies":
        return [replace(base, colocated=False, policy=p, label=p) for p in COMPARE_POLICIES]
    if kind == "rejection":
        return [replace(base, rejection=r, label=f"rejection {r}") for r in REJECTIONS]
    raise ValueError(f"unknown comparison {kind!r}")


def _run_many(trace: list[dict], configs: list[ServeConfig], cost: CostModel, jobs: int) -> list[RunResult]:
    if jobs <= 1 or len(configs) == 1:
        return [simulate(trace, c, cost) for c in configs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(simulate, [trace] * len(configs), configs, [cost] * len(configs)))


def _compare_plots(kind: str, configs: list[ServeConfig], results: list[RunResult], base: ServeConfig,
                   trace_name: str, plot_dir: str) -> list[str]:
    from tsukimi.sim import serve_plot

    os.makedirs(plot_dir, exist_ok=True)
    where = f"{trace_name}, rate x{base.rate_scale:g}"
    tag = base.label or f"{base.prefill}p{base.decode}d_rate{base.rate_scale:g}"
    paths = []
    if kind == "systems":
        path = os.path.join(plot_dir, f"compare_systems_capacity_{tag}.png")
        serve_plot.plot_capacity({c.name(): r.summary["capacity_vs_tbt"] for c, r in zip(configs, results)},
                                 base.ttft_slo_s, f"Effective capacity vs TBT threshold: {where}", path)
        paths.append(path)
    elif kind == "policies":
        path = os.path.join(plot_dir, f"compare_policies_ttft_{tag}.png")
        serve_plot.plot_bars({c.name(): r.summary["avg_ttft_s"] or 0.0 for c, r in zip(configs, results)},
                             "average TTFT (s)",
                             f"Average TTFT per policy, {base.prefill}P+{base.decode}D: {where}", path)
        paths.append(path)
    else:
        path = os.path.join(plot_dir, f"compare_rejection_load_{base.policy}_{tag}.png")
        serve_plot.plot_load_panels(
            {f"{c.name()}: {r.summary['rejected']} rejected": r.samples for c, r in zip(configs, results)},
            f"Pool load over time, {base.policy} {base.prefill}P+{base.decode}D: {where}", path)
        paths.append(path)
    return paths


def write_plots(cfg: ServeConfig, result: RunResult, trace_name: str, plot_dir: str) -> list[str]:
    """CDFs of TTFT and TBT, pool load over time, capacity vs TBT threshold; returns the paths."""
    from tsukimi.sim import serve_plot

    os.makedirs(plot_dir, exist_ok=True)
    stem = os.path.join(plot_dir, cfg.name())
    title = f"{cfg.title()}: {trace_name}"
    serve_plot.plot_cdfs(result.ttft, result.tbt, cfg.ttft_slo_s, cfg.tbt_slo_s, title, f"{stem}_cdf.png")
    serve_plot.plot_load(result.samples, cfg.colocated, title, f"{stem}_load.png")
    serve_plot.plot_capacity({cfg.name(): result.summary["capacity_vs_tbt"]}, cfg.ttft_slo_s, title,
                             f"{stem}_capacity.png")
    return [f"{stem}_cdf.png", f"{stem}_load.png", f"{stem}_capacity.png"]


# ---- command line ----------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    parser.add_argument("--policy", choices=POLICIES, default="mooncake", help="placement policy (disaggregated)")
    parser.add_argument("--rejection", choices=REJECTIONS, default="none", help="early rejection mode")
    parser.add_argument("--prefill", type=int, default=8, help="prefill nodes (colocated: added to --decode)")
    parser.add_argument("--decode", type=int, default=8, help="decode nodes")
    parser.add_argument("--colocated", action="store_true",
                        help="vLLM-style baseline: prefill+decode instances each doing both, no pool, no transfer")
    parser.add_argument("--chunked-prefill", type=int, default=0, metavar="TOKENS",
                        help="colocated: mix up to TOKENS prompt tokens into each decode step (0: whole prefills)")
    parser.add_argument("--local-prefix-cache", action="store_true",
                        help="colocated: each instance reuses its own cached prefixes (vLLM prefix caching)")
    parser.add_argument("--cache-tokens-per-node", type=_positive_float, default=DEFAULT_CACHE_TOKENS,
                        help="disaggregated: each prefill node's share of the KV pool, tokens (default 3e6: the "
                             "paper's ~3M tokens of DRAM per node)")
    parser.add_argument("--kv-tokens-per-instance", type=_positive_float, default=DEFAULT_KV_TOKENS,
                        help="KV tokens an instance's HBM holds (decode batch limit; colocated prefix cache size)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most sequences in a decode batch")
    parser.add_argument("--ttft-slo", type=_positive_float, default=30.0, help="TTFT SLO, s")
    parser.add_argument("--tbt-slo", type=_positive_float, default=0.1, help="TBT SLO, s")
    parser.add_argument("--rate-scale", type=_positive_float, default=1.0,
                        help="request rate multiplier (arrival times are divided by it)")
    parser.add_argument("--cost-model", default="roofline",
                        help="'roofline' (LLaMA3-70B on 8 x A800), 'roofline:<model>/<gpu>/<n>', or a JSON file of "
                             "CostModel fields")
    parser.add_argument("--transfer-bytes-per-s", type=_positive_float, default=PlacementConfig.transfer_bytes_per_s,
                        help="KV transfer bandwidth between instances (prefix fetch and prefill->decode)")
    parser.add_argument("--balance-threshold", type=int, default=PlacementConfig.balance_threshold_blocks,
                        help="mooncake: fetch a remote prefix only when longer than the local one by more blocks")
    parser.add_argument("--overlap-kv", action="store_true",
                        help="stream the KV to decode layer by layer during the prefill (only the part the compute "
                             "does not hide delays the second token)")
    parser.add_argument("--view-refresh", type=float, default=0.0, metavar="SECONDS",
                        help="disaggregated: every SECONDS, re-book the conductor's decode entries from the decode "
                             "nodes' real progress (a per-request heartbeat the conductor does not get today; 0: off)")
    parser.add_argument("--decode-wait", type=float, default=0.0, metavar="SECONDS",
                        help="disaggregated, with rejection: a request no decode node has room for waits up to "
                             "SECONDS for it, as in the conductor (0: rejected at once)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N requests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    parser.add_argument("--sample-every", type=_positive_float, default=2.0, help="load sampling period, s")
    parser.add_argument("--compare", choices=("systems", "policies", "rejection"), default=None,
                        help="run several configurations: systems (Mooncake vs colocated plain/+prefix cache/"
                             "+chunked prefill, same node count), policies, or rejection modes")
    parser.add_argument("--jobs", type=int, default=1, help="--compare: simulations run in parallel processes")
    parser.add_argument("--label", default="",
                        help="name of the run in plot file names (with --compare: the figure's file name suffix)")
    parser.add_argument("--plot-dir", default=None, help="directory for PNG figures")
    parser.add_argument("--json", action="store_true", help="print JSON")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.colocated and args.compare is None:
        if args.prefill < 0 or args.decode < 0 or args.prefill + args.decode <= 0:
            raise SystemExit("--colocated needs --prefill + --decode > 0 instances")
    elif args.prefill <= 0 or args.decode <= 0:
        raise SystemExit("--prefill and --decode must be positive")
    return ServeConfig(
        colocated=args.colocated, prefill=args.prefill, decode=args.decode, policy=args.policy,
        rejection=args.rejection, chunked_prefill=args.chunked_prefill, local_prefix_cache=args.local_prefix_cache,
        cache_tokens_per_node=args.cache_tokens_per_node, kv_tokens_per_instance=args.kv_tokens_per_instance,
        max_batch=args.max_batch, ttft_slo_s=args.ttft_slo, tbt_slo_s=args.tbt_slo, rate_scale=args.rate_scale,
        transfer_bytes_per_s=args.transfer_bytes_per_s, balance_threshold_blocks=args.balance_threshold,
        overlap_kv=args.overlap_kv, view_refresh_s=args.view_refresh, decode_wait_s=args.decode_wait,
        limit=args.limit, seed=args.seed,
        sample_every_s=args.sample_every, label=args.label)


def _print_summary(s: dict) -> None:
    cfg = s["config"]
    print(f"{cfg['system']}: {s['num_requests']} requests, {s['completed']} completed, {s['rejected']} rejected "
          f"{s['rejected_by_reason'] or ''}")

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    print(f"  TTFT s: avg {fmt(s['avg_ttft_s'])}  p50 {fmt(s['p50_ttft_s'])}  p90 {fmt(s['p90_ttft_s'])}  "
          f"p99 {fmt(s['p99_ttft_s'])}")
    print(f"  TBT s:  avg {fmt(s['avg_tbt_s'])}  p50 {fmt(s['p50_tbt_s'])}  p90 {fmt(s['p90_tbt_s'])}  "
          f"p99 {fmt(s['p99_tbt_s'])}")
    at = s["effective_capacity_at_tbt"]
    print(f"  effective capacity {s['effective_capacity']:.4f} (TTFT <= {cfg['ttft_slo_s']:g} s, TBT <= "
          f"{cfg['tbt_slo_s']:g} s); at TBT 0.1/0.2/0.3 s: {at['0.1']:.4f} / {at['0.2']:.4f} / {at['0.3']:.4f}")
    print(f"  token hit ratio {s['token_hit_ratio']:.4f} (fetched from other nodes {s['remote_hit_ratio']:.4f}), "
          f"prefill compute {s['prefill_compute_s']:.1f} s, simulated {s['simulated_s']:.1f} s")


def run(args: argparse.Namespace) -> int:
    base = config_from_args(args)
    cost = load_cost_model(args.cost_model)
    trace = load_trace(args.trace)
    trace_name = os.path.basename(args.trace)
    if args.compare:
        configs = compare_configs(args.compare, base)
        results = _run_many(trace, configs, cost, args.jobs)
        for c, r in zip(configs, results):
            print(f"{c.name()}: simulated in {r.wall_s:.1f} s", file=sys.stderr)
        plots = _compare_plots(args.compare, configs, results, base, trace_name, args.plot_dir) \
            if args.plot_dir else []
        if args.json:
            print(json.dumps({"compare": args.compare, "runs": {c.name(): r.summary for c, r in zip(configs, results)},
                              "plots": plots}))
        else:
            for r in results:
                _print_summary(r.summary)
            for p in plots:
                print(f"wrote {p}")
        return 0
    result = simulate(trace, base, cost)
    print(f"{base.name()}: simulated in {result.wall_s:.1f} s", file=sys.stderr)
    plots = write_plots(base, result, trace_name, args.plot_dir) if args.plot_dir else []
    if args.json:
        print(json.dumps({**result.summary, "plots": plots}))
    else:
        _print_summary(result.summary)
        for p in plots:
            print(f"wrote {p}")
    return 0
