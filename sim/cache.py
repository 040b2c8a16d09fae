"""`tsukimi sim cache`: replays a Mooncake-format trace's `hash_ids` through the pool's own index and eviction
code (`tsukimi.cachestore.lru_index`), no model and no processes, and reports the prefix hit ratios.

Per request, in arrival order: the leading blocks already cached are hits (tokens: hits x block size, capped at
the input length); then the request's blocks are stored (its present blocks pinned meanwhile, as a reader's
lease would), evicting by LRU past the high watermark.
"""

from __future__ import annotations

import argparse
import json
import math

from tsukimi.cachestore.lru_index import LruBlockIndex, TierFull

BLOCK_TOKENS = 512


def load_trace(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def simulate(trace: list[dict], capacity_tokens: float, block_tokens: int = BLOCK_TOKENS,
             high_watermark: float = 0.9, evict_share: float = 0.05) -> dict:
    """Hit ratios of `trace` with a pool of `capacity_tokens` (math.inf: unbounded)."""
    capacity = None if math.isinf(capacity_tokens) else int(capacity_tokens)
    index = LruBlockIndex(capacity, high_watermark, evict_share)
    hit_tokens = total_tokens = hit_blocks = total_blocks = 0
    for request in trace:
        keys = request["hash_ids"]
        n = index.match_prefix(keys)
        hit_blocks += n
        total_blocks += len(keys)
        hit_tokens += min(n * block_tokens, request["input_length"])
        total_tokens += request["input_length"]
        for key in keys[:n]:
            index.pin(key)
        try:
            for key in keys[n:]:
                index.insert(key, block_tokens)
        except TierFull:
            pass  # NOTE: a prompt larger than the whole pool keeps what fits.
        for key in keys[:n]:
            index.unpin(key)
    return {
        "capacity_tokens": "inf" if capacity is None else capacity,
        "num_requests": len(trace),
        "token_hit_ratio": round(hit_tokens / max(1, total_tokens), 4),
        "block_hit_ratio": round(hit_blocks / max(1, total_blocks), 4),
        "evictions": index.num_evictions,
    }


def plot(results: list[dict], path: str, trace_name: str) -> None:
    """Hit ratio against pool capacity (the paper's Figure 9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounded = [r for r in results if r["capacity_tokens"] != "inf"]
    xs = [r["capacity_tokens"] for r in bounded]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["token_hit_ratio"] for r in bounded], marker="o", label="token hit ratio")
    ax.plot(xs, [r["block_hit_ratio"] for r in bounded], marker="s", label="block hit ratio")
    for r in results:
        if r["capacity_tokens"] == "inf":
            ax.axhline(r["token_hit_ratio"], linestyle="--", color="gray", label="unbounded (token)")
    ax.set_xscale("log")
    ax.set_xlabel("pool capacity (tokens)")
    ax.set_ylabel("hit ratio")
    ax.set_ylim(0, 1)
    ax.set_title(f"Prefix cache hit ratio vs capacity: {trace_name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _capacity(text: str) -> float:
    if text.lower() in ("inf", "infinite", "unbounded"):
        return math.inf
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("capacity must be positive or 'inf'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    parser.add_argument("--capacity-tokens", type=_capacity, nargs="+", default=[math.inf],
                        help="pool capacity in tokens, or 'inf'; several values draw a curve")
    parser.add_argument("--block-tokens", type=int, default=BLOCK_TOKENS, help="tokens per hash id")
    parser.add_argument("--plot", default=None, help="PNG path for the hit-ratio-versus-capacity curve")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    results = [simulate(trace, c, args.block_tokens) for c in args.capacity_tokens]
    if args.plot:
        import os

        plot(results, args.plot, os.path.basename(args.trace))
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    else:
        for r in results:
            print(f"capacity {r['capacity_tokens']}: token hit ratio {r['token_hit_ratio']:.4f}, block hit ratio "
                  f"{r['block_hit_ratio']:.4f}, evictions {r['evictions']}")
    return 0
