"""`tsukimi bench serve`: load against any OpenAI-compatible endpoint, measured the Mooncake way.

Replays a Mooncake-format trace open loop (each request at its timestamp, never waiting for earlier answers) or
synthetic Poisson load, streams every answer from POST /v1/completions, and reports TTFT, TBT (mean of the
longest 10% inter-token gaps), TPOT and ITL percentiles, effective request capacity (share of ALL scheduled
requests meeting both SLOs), goodput, rejection (429) and failure rates, prefix hit rate and throughput.
`--sweep` measures several loads and finds the highest request rate at which `--target` of the requests meet
both SLOs. Prompt token ids are drawn inside the served model's vocabulary, never its special tokens (see
`serve_vocab`: `--tokenizer DIR`, `--vocab-size N`, or what the server's /v1/models lists).

Defaults suit a 2-core CPU machine serving the demo model (prefill ~0.7 ms/token, decode step 15-40 ms):
length scale 0.02 (a 15k-token prompt becomes ~300 tokens, a 512-token block 10), output scale 0.1 (149 tokens
become ~15), SLOs TTFT 2 s and TBT
0.15 s, 60 s of replay per sweep point, at most 7 points (about 11 minutes at worst).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time

from tsukimi.bench.serve_metrics import per_request, summarize
from tsukimi.bench.serve_record import write_records
from tsukimi.bench.serve_sweep import RateSearch
from tsukimi.bench.serve_vocab import Vocabulary, from_card, from_tokenizer
from tsukimi.bench.serve_workload import (
    TRACE_BLOCK_TOKENS,
    PromptMaker,
    Schedule,
    scale_length,
    synthetic_schedule,
    trace_schedule,
)

# Replay seconds per sweep point when --duration is not given.
SWEEP_POINT_S = 60.0
# Replay seconds of a synthetic run with neither --duration nor --limit.
SYNTHETIC_S = 60.0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    return parse


def _id_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _rate_list(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive numbers")
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    parser.add_argument("--model", help="model name (default: the first one GET /v1/models lists)")
    work = parser.add_mutually_exclusive_group(required=True)
    work.add_argument("--trace", metavar="FILE", help="replay a Mooncake-format trace (JSON lines)")
    work.add_argument("--synthetic", action="store_true", help="Poisson arrivals at --rate req/s")
    trace = parser.add_argument_group("trace replay")
    trace.add_argument("--rate-scale", type=_positive(float), default=1.0,
                       help="arrival times are divided by it (2 = twice the trace's rate; default %(default)s)")
    trace.add_argument("--length-scale", type=_positive(float), default=0.02,
                       help="input lengths and the 512-token block are multiplied by it "
                            "(default %(default)s: a 15k-token prompt becomes ~300 tokens, a block 10)")
    trace.add_argument("--output-scale", type=_positive(float), default=0.1,
                       help="output lengths are multiplied by it (default %(default)s: the trace's mean of 149 "
                            "tokens becomes ~15, so decode and its TBT matter)")
    parser.add_argument("--limit", type=_positive(int), help="at most N requests (the first ones)")
    parser.add_argument("--duration", type=_positive(float),
                        help="stop scheduling after S seconds of replay time (arrivals after rate scaling); "
                             f"default: the whole trace, {SYNTHETIC_S:g} s for --synthetic without --limit, "
                             f"{SWEEP_POINT_S:g} s per --sweep point")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-size", type=_positive(int),
                       help="prompt token ids are drawn from 0..N-1 but --avoid-ids (default: the vocabulary of "
                            "--tokenizer, else the one the server's /v1/models lists, else an error)")
    vocab.add_argument("--tokenizer", metavar="DIR",
                       help="the model's checkpoint or tokenizer directory ('demo': the demo model): prompt "
                            "ids are its token ids but its special and unused ones")
    parser.add_argument("--avoid-ids", type=_id_list, default=[],
                        help="token ids never put in prompts besides the special ones (comma-separated)")
    parser.add_argument("--prompt-salt", type=int,
                        help="seed mixed into every block's generator (default: a fresh one per run and per sweep "
                             "point, so a run never reuses the server's cache from an earlier one)")
    syn = parser.add_argument_group("synthetic load")
    syn.add_argument("--rate", type=_positive(float), default=1.0, help="requests/s (default %(default)s)")
    syn.add_argument("--input-len", type=_positive(int), default=300, help="prompt tokens (default %(default)s)")
    syn.add_argument("--output-len", type=_positive(int), default=8, help="max_tokens (default %(default)s)")
    syn.add_argument("--range-ratio", type=float, default=0.0,
                     help="lengths uniform within +-ratio of the given ones (default 0: fixed)")
    syn.add_argument("--prefix-ratio", type=float, default=0.0,
                     help="share of --input-len every prompt starts with, the same for all (default 0)")
    syn.add_argument("--seed", type=int, default=0, help="seed of arrivals and lengths (default %(default)s)")
    slo = parser.add_argument_group("SLOs and client")
    slo.add_argument("--ttft-slo", type=_positive(float), default=2.0, help="seconds (default %(default)s)")
    slo.add_argument("--tbt-slo", type=_positive(float), default=0.15, help="seconds (default %(default)s)")
    slo.add_argument("--max-outstanding", type=_positive(int), default=256,
                     help="requests in flight at most; later ones fail as client_overload (default %(default)s)")
    slo.add_argument("--request-timeout", type=_positive(float), default=120.0,
                     help="seconds without a byte before a request fails (default %(default)s)")
    slo.add_argument("--drain-timeout", type=_positive(float), default=30.0,
                     help="seconds to wait for answers after the last arrival; then unfinished (default %(default)s)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true",
                       help="measure several loads and find the highest request rate meeting --target")
    sweep.add_argument("--rates", type=_rate_list,
                       help="loads to measure, comma-separated: rate scales with --trace, req/s with --synthetic "
                            "(default: a geometric search from --sweep-start)")
    sweep.add_argument("--target", type=_positive(float), default=0.9,
                       help="share of requests that must meet both SLOs (default %(default)s)")
    sweep.add_argument("--sweep-start", type=_positive(float),
                       help="first load of the search (default: --rate-scale, or --rate with --synthetic)")
    sweep.add_argument("--sweep-factor", type=float, default=2.0, help="search step ratio (default %(default)s)")
    sweep.add_argument("--sweep-precision", type=float, default=1.2,
                       help="stop when the passing and failing loads are within this ratio (default %(default)s)")
    sweep.add_argument("--sweep-points", type=_positive(int), default=7, help="points at most (default %(default)s)")
    sweep.add_argument("--cooldown", type=float, default=5.0,
                       help="seconds of idle between sweep points (default %(default)s)")
    parser.add_argument("--plot-dir", help="write TTFT/TBT CDFs (and capacity versus rate with --sweep) here")
    parser.add_argument("--json", action="store_true", help="print one JSON object (no progress line)")
    parser.add_argument("--records", metavar="FILE",
                        help="append every request's record (one JSON object per line: load, prompt length, "
                             "outcome, send and token times) to FILE, for analysis")


class Bench:
    """One invocation: the workload source, the client settings, and how to measure one load."""

    def __init__(self, args: argparse.Namespace, model: str, vocab: Vocabulary):
        self.args = args
        self.model = model
        self.vocab = vocab
        self.trace = None
        if args.trace:
            from tsukimi.sim.cache import load_trace

            self.trace = load_trace(args.trace)
        self.base_salt = args.prompt_salt if args.prompt_salt is not None else secrets.randbits(31)

    @property
    def load_name(self) -> str:
        return "rate_scale" if self.trace is not None else "rate"

    def duration(self, sweeping: bool) -> float | None:
        a = self.args
        if a.duration is not None:
            return a.duration
        if sweeping:
            return SWEEP_POINT_S
        return SYNTHETIC_S if self.trace is None and a.limit is None else None

    def schedule(self, load: float, salt: int, sweeping: bool) -> Schedule:
        a = self.args
        maker = PromptMaker(self.vocab.size, self.vocab.avoid_ids, salt)
        if self.trace is not None:
            return trace_schedule(self.trace, maker, rate_scale=load, length_scale=a.length_scale,
                                  output_scale=a.output_scale, limit=a.limit,
                                  duration_s=self.duration(sweeping))
        return synthetic_schedule(maker, rate=load, input_len=a.input_len, output_len=a.output_len,
                                  range_ratio=a.range_ratio, prefix_ratio=a.prefix_ratio, limit=a.limit,
                                  duration_s=self.duration(sweeping), seed=a.seed)

    async def measure(self, load: float, salt: int, sweeping: bool, label: str = "") -> tuple[dict, tuple]:
        """Runs one load; returns its summary and the (TTFT, TBT) arrays."""
        from tsukimi.bench.serve_client import Progress, run_schedule

        a = self.args
        schedule = self.schedule(load, salt, sweeping)
        progress = None if a.json else Progress(len(schedule.requests), label)
        out = await run_schedule(schedule.requests, a.url, self.model, max_outstanding=a.max_outstanding,
                                 request_timeout_s=a.request_timeout, drain_timeout_s=a.drain_timeout,
                                 progress=progress)
        summary = {self.load_name: load, "prompt_salt": salt,
                   **summarize(out.records, elapsed_s=out.elapsed_s, window_s=schedule.window_s,
                               ttft_slo_s=a.ttft_slo, tbt_slo_s=a.tbt_slo)}
        if a.records:
            write_records(a.records, {self.load_name: load, "prompt_salt": salt},
                          [len(r.prompt) for r in schedule.requests], out.records)
        return summary, per_request(out.records)

    def config(self) -> dict:
        a = self.args
        cfg = {"url": a.url, "model": self.model, "ttft_slo_s": a.ttft_slo, "tbt_slo_s": a.tbt_slo,
               "limit": a.limit, "duration_s": self.duration(a.sweep), "vocab_size": self.vocab.size,
               "avoid_ids": list(self.vocab.avoid_ids), "vocab_source": self.vocab.source,
               "prompt_salt": self.base_salt, "max_outstanding": a.max_outstanding,
               "request_timeout_s": a.request_timeout, "drain_timeout_s": a.drain_timeout}
        if self.trace is not None:
            cfg.update(workload="trace", trace=a.trace, rate_scale=a.rate_scale, length_scale=a.length_scale,
                       output_scale=a.output_scale,
                       block_tokens=scale_length(TRACE_BLOCK_TOKENS, a.length_scale))
        else:
            cfg.update(workload="synthetic", rate=a.rate, input_len=a.input_len, output_len=a.output_len,
                       range_ratio=a.range_ratio, prefix_ratio=a.prefix_ratio, seed=a.seed)
        if a.sweep:
            cfg.update(target=a.target, rates=a.rates, sweep_start=self.sweep_start, sweep_factor=a.sweep_factor,
                       sweep_precision=a.sweep_precision, sweep_points=a.sweep_points, cooldown_s=a.cooldown)
        return cfg

    @property
    def sweep_start(self) -> float:
        a = self.args
        if a.sweep_start is not None:
            return a.sweep_start
        return a.rate_scale if self.trace is not None else a.rate

    async def single(self) -> dict:
        a = self.args
        load = a.rate_scale if self.trace is not None else a.rate
        summary, (ttft, tbt) = await self.measure(load, self.base_salt, sweeping=False)
        plots = []
        if a.plot_dir:
            from tsukimi.bench.serve_plot import write_cdfs

            plots.append(write_cdfs(ttft, tbt, a.ttft_slo, a.tbt_slo, self._title(summary), a.plot_dir))
        return {**summary, "config": self.config(), "plots": plots}

    async def sweep(self) -> dict:
        a = self.args
        search = RateSearch(a.target, rates=a.rates, start=self.sweep_start, factor=a.sweep_factor,
                            precision=a.sweep_precision, max_points=a.sweep_points)
        points: list[dict] = []
        cdfs: dict[float, tuple] = {}
        while (load := search.next()) is not None:
            if points and a.cooldown > 0:
                await asyncio.sleep(a.cooldown)
            label = f"{self.load_name} {load:.3g} "
            summary, arrays = await self.measure(load, self.base_salt + len(points) + 1, True, label)
            search.record(load, summary["effective_capacity"])
            points.append(summary)
            cdfs[load] = arrays
            if not a.json:
                print(f"  {self.load_name} {load:.3g}: {summary['offered_rate_rps']} req/s offered, effective "
                      f"capacity {summary['effective_capacity']:.3f}, rejected {summary['rejection_rate']}, "
                      f"failed {summary['failure_rate']}", file=sys.stderr)
        best = search.best
        at_best = next((p for p in points if p[self.load_name] == best), None)
        plots = []
        if a.plot_dir:
            from tsukimi.bench.serve_plot import write_capacity, write_cdfs

            curve = [(p["offered_rate_rps"] or 0.0, p["effective_capacity"]) for p in points]
            plots.append(write_capacity(curve, a.target, f"{self.model}: effective capacity (TTFT <= "
                                        f"{a.ttft_slo:g} s, TBT <= {a.tbt_slo:g} s)", a.plot_dir))
            if at_best is not None:
                ttft, tbt = cdfs[best]
                plots.append(write_cdfs(ttft, tbt, a.ttft_slo, a.tbt_slo, self._title(at_best), a.plot_dir))
        return {
            "max_rate_at_slo": at_best["offered_rate_rps"] if at_best else 0.0,
            f"best_{self.load_name}": best,
            "effective_capacity": at_best["effective_capacity"] if at_best else None,
            "target": a.target,
            "points": sorted(points, key=lambda p: p[self.load_name]),
            "config": self.config(),
            "plots": plots,
        }

    def _title(self, s: dict) -> str:
        return (f"{self.model}, {self.load_name} {s[self.load_name]:g} ({s['offered_rate_rps']} req/s): effective "
                f"capacity {s['effective_capacity']:.3f}")


def _fmt(d: dict) -> str:
    return " ".join(f"{k} {'-' if v is None else f'{v * 1e3:.1f}'}" for k, v in d.items()) + " ms"


def print_summary(s: dict) -> None:
    print(f"{s['num_scheduled']} requests scheduled over {s['window_s']:g} s ({s['offered_rate_rps']} req/s): "
          f"{s['completed']} completed, {s['rejected']} rejected (rate {s['rejection_rate']}), {s['failed']} failed "
          f"(rate {s['failure_rate']}) {s['failed_by_kind'] or ''}")
    print(f"  TTFT  {_fmt(s['ttft_s'])}")
    print(f"  TBT   {_fmt(s['tbt_s'])}")
    print(f"  TPOT  {_fmt(s['tpot_s'])}")
    print(f"  ITL   {_fmt(s['itl_s'])}")
    print(f"  effective capacity {s['effective_capacity']:.3f} ({s['meeting_slo']} meet both SLOs; TTFT "
          f"attainment {s['ttft_slo_attainment']:.3f}, TBT {s['tbt_slo_attainment']:.3f}), goodput "
          f"{s['goodput_rps']} req/s")
    print(f"  prefix hit rate {s['prefix_hit_rate']} ({s['cached_tokens']} of {s['prompt_tokens']} prompt tokens)")
    print(f"  throughput {s['request_throughput_rps']} req/s, {s['output_throughput_tps']} output tokens/s; "
          f"{s['output_tokens']} of {s['requested_output_tokens']} requested tokens received "
          f"({s['short_answers']} short answers), {s['tokens_per_chunk']} tokens per chunk")


async def _main(args: argparse.Namespace) -> dict:
    from tsukimi.bench.serve_client import model_cards

    model, vocab = args.model, None
    if args.vocab_size is not None:
        vocab = Vocabulary.of(args.vocab_size, args.avoid_ids, "--vocab-size")
    elif args.tokenizer:
        vocab = from_tokenizer(args.tokenizer, args.avoid_ids)
    if model is None or vocab is None:
        cards = await model_cards(args.url)
        card = cards[0] if model is None else next((c for c in cards if c.get("id") == model), {"id": model})
        model = card["id"]
        vocab = vocab or from_card(card, f"{args.url.rstrip('/')}/v1/models", args.avoid_ids)
    bench = Bench(args, model, vocab)
    return await (bench.sweep() if args.sweep else bench.single())


def run(args: argparse.Namespace) -> int:
    try:
        import httpx
    except ImportError:
        print("tsukimi bench serve needs httpx: pip install httpx", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        result = asyncio.run(_main(args))
    except (OSError, RuntimeError, ValueError, httpx.HTTPError) as exc:
        print(f"tsukimi bench serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    result["wall_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result))
        return 0
    if args.sweep:
        print(f"highest rate with effective capacity >= {result['target']:g}: {result['max_rate_at_slo']} req/s "
              f"({result['config']['workload']}, {len(result['points'])} points, {result['wall_s']} s)")
        for p in result["points"]:
            print(f"--- {'rate_scale' if 'rate_scale' in p else 'rate'} "
                  f"{p.get('rate_scale', p.get('rate')):g}")
            print_summary(p)
    else:
        print_summary(result)
    for path in result["plots"]:
        print(f"wrote {path}")
    return 0
