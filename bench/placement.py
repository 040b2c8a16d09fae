"""`tsukimi bench placement`: how long the conductor takes to place one request on a large cluster: the cache
index lookup (a pool view fed by events) plus the placement policy, with block keys given. No broker."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from tsukimi.common.cost_model import roofline
from tsukimi.common.messages import (
    BlockStored, CachestoreStatus, DecodeStatus, Heartbeat, PoolEvents, PoolSnapshot, PrefillStatus,
)
from tsukimi.kvpool.pool_view import PoolView
from tsukimi.conductor.cluster import ClusterView, DecodeEntry
from tsukimi.conductor.placement import PlacementConfig, Placer, Request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=int, default=64, help="prefill instances (and as many decode)")
    parser.add_argument("--cachestores", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128 * 1024)
    parser.add_argument("--block-tokens", type=int, default=64)
    parser.add_argument("--running", type=int, default=32, help="requests running on each decode instance")
    parser.add_argument("--policy", default="mooncake")
    parser.add_argument("--rejection", default="predicted")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--json", action="store_true")


def build(args) -> tuple[ClusterView, Placer, Request, list[bytes]]:
    """A cluster whose cachestores hold prefixes of various lengths of the prompt's keys."""
    rng = random.Random(0)
    cost = roofline()
    keys = [rng.randbytes(32) for _ in range(args.prompt_tokens // args.block_tokens)]
    pool = PoolView()
    pool.load(PoolSnapshot(epoch="bench", seq=0, replicas=[]))
    events = [BlockStored(key, f"cs{c}", "dram") for c in range(args.cachestores)
              for key in keys[: rng.randrange(len(keys))]]
    pool.apply(PoolEvents(epoch="bench", seq=1, events=events))
    view = ClusterView(pool)
    for i in range(args.instances):
        host = f"h{i % args.cachestores}"
        view.observe(Heartbeat(instance_id=f"p{i}", model="m", host=host, cost_model=cost,
                               status=PrefillStatus(queued_prefill_s=rng.random() * 5)), 0.0)
        view.observe(Heartbeat(instance_id=f"d{i}", model="m", host=host, cost_model=cost,
                               status=DecodeStatus(max_running=128, num_free_kv_bytes=1 << 40,
                                                   num_running=args.running)), 0.0)
    for c in range(args.cachestores):
        view.observe(Heartbeat(instance_id=f"cs{c}", status=CachestoreStatus(), host=f"h{c}"), 0.0)
    for d in view.decodes.values():
        for j in range(args.running):
            d.add(f"{d.instance_id}-{j}", DecodeEntry(rng.randrange(1000, 100_000), 0.0, rng.random() * 60))
    placer = Placer(PlacementConfig(policy=args.policy, rejection=args.rejection, block_tokens=args.block_tokens,
                                    ttft_slo_s=1e9, tbt_slo_s=1e9))
    return view, placer, Request("bench", args.prompt_tokens, 512, tuple(keys)), keys


def run(args) -> dict:
    view, placer, request, keys = build(args)
    prefills, decodes = view.serving("m")
    times = []
    decision = None
    for _ in range(args.repeats):
        started = time.perf_counter()
        holdings = view.holdings(keys, prefills)
        decision = placer.place(request, 1.0, prefills, decodes, holdings)
        times.append(time.perf_counter() - started)
    times.sort()
    return {"instances": args.instances, "cachestores": args.cachestores, "prompt_tokens": args.prompt_tokens,
            "num_keys": len(keys), "running_per_decode": args.running, "policy": args.policy,
            "p50_ms": round(statistics.median(times) * 1e3, 4), "p99_ms": round(times[int(0.99 * len(times))] * 1e3, 4),
            "mean_ms": round(statistics.fmean(times) * 1e3, 4), "chosen_prefill": decision.prefill_id,
            "reused_blocks": decision.num_reused_blocks}


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(f"placement of a {result['prompt_tokens']}-token prompt ({result['num_keys']} keys) on {result['instances']} "
          f"prefill + {result['instances']} decode instances, {result['cachestores']} cachestores, policy "
          f"{result['policy']}: p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms")
