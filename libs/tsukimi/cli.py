"""The `tsukimi` command: one subcommand per service, plus `up` (the whole system) and `version`."""

from __future__ import annotations

import argparse
import importlib
import sys

SERVICES = ("gateway", "conductor", "prefill", "decode", "cachestore")
# Services that load the model (they have torch) and so may pull and convert one that is not in the cache yet.
WORKERS = ("prefill", "decode")


def _run_service(name: str) -> int:
    from pydantic import ValidationError

    from tsukimi.common.logs import setup_logging
    from tsukimi.common.settings import Settings
    from tsukimi.model.resolve import ModelUnavailable, resolve_settings

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"tsukimi {name}: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    try:
        settings = resolve_settings(settings, can_pull=name in WORKERS)
    except ModelUnavailable as exc:
        print(f"tsukimi {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tsukimi {name}: interrupted while preparing the model; nothing was installed", file=sys.stderr)
        return 130
    setup_logging(name, settings.log_level)
    module = importlib.import_module(f"tsukimi.{name}.service")
    module.main(settings)
    return 0


def main(argv: list[str] | None = None) -> int:
    from tsukimi.common import grpc_defaults

    grpc_defaults.apply()  # NOTE: before anything below imports grpc (services and benchmarks alike).
    parser = argparse.ArgumentParser(prog="tsukimi", description="KVCache-centric disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SERVICES:
        sub.add_parser(name, help=f"run one {name} instance (configured by TSUKIMI_* env vars)")
    from tsukimi.launcher import add_up_arguments

    add_up_arguments(sub.add_parser("up", help="start the whole system: NATS, every service, the API"))
    from tsukimi.model import cli as model_cli

    model_cli.add_arguments(sub.add_parser("model", help="pull a known model or convert a GGUF; list the cache"))
    bench = sub.add_parser("bench", help="benchmarks that print numbers").add_subparsers(dest="bench", required=True)
    from tsukimi.bench import transfer as transfer_bench

    transfer_bench.add_arguments(bench.add_parser("transfer", help="transfer engine throughput between two processes"))
    from tsukimi.bench import cachestore as cachestore_bench

    cachestore_bench.add_arguments(bench.add_parser("cachestore", help="put/get throughput of the KV cache pool"))
    from tsukimi.bench import placement as placement_bench

    placement_bench.add_arguments(bench.add_parser("placement", help="time of one conductor placement decision"))
    from tsukimi.bench import serve as serve_bench
    from tsukimi.bench import vs_generate as generate_bench

    serve_bench.add_arguments(bench.add_parser(
        "serve", help="load an OpenAI-compatible endpoint (trace replay or synthetic): TTFT, TBT, capacity"))
    generate_bench.add_arguments(bench.add_parser(
        "generate", help="a running server beside transformers' generate on the same prompts: TTFT, TBT, tokens/s"))
    sim = sub.add_parser("sim", help="simulations that run the services' own policy code").add_subparsers(
        dest="sim", required=True)
    from tsukimi.sim import cache as cache_sim

    cache_sim.add_arguments(sim.add_parser("cache", help="replay a trace's hash_ids through the pool's index"))
    from tsukimi.sim import serve as serve_sim

    serve_sim.add_arguments(sim.add_parser(
        "serve", help="replay a trace through the conductor's placement on modelled prefill/decode instances"))
    args = parser.parse_args(argv)
    if args.command == "model":
        return model_cli.run(args)
    if args.command == "sim":
        return serve_sim.run(args) if args.sim == "serve" else cache_sim.run(args)
    if args.command == "bench" and args.bench == "placement":
        placement_bench.print_result(placement_bench.run(args), args.json)
        return 0
    if args.command == "bench" and args.bench == "serve":
        return serve_bench.run(args)
    if args.command == "bench" and args.bench == "generate":
        return generate_bench.run(args)
    if args.command == "bench" and args.bench == "cachestore":
        cachestore_bench.print_results(cachestore_bench.run(args), args.json)
        return 0
    if args.command == "bench":
        transfer_bench.print_result(transfer_bench.run(args), args.json)
        return 0
    if args.command in SERVICES:
        return _run_service(args.command)
    from tsukimi.launcher import up

    return up(args)


if __name__ == "__main__":
    sys.exit(main())
