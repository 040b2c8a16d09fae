"""The `tsukimi` command: one subcommand per service, plus `up` (the whole system), `model`, `bench` and `sim`.

A subcommand's module is imported only when that subcommand runs or shows its own `--help`, so `tsukimi --help`
and the light subcommands (`sim`, `model`, ...) work without the extras the others need (grpc, torch, nats).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

SERVICES = ("gateway", "conductor", "prefill", "decode", "cachestore")
# Services that load the model (they have torch) and so may pull and convert one that is not in the cache yet.
WORKERS = ("prefill", "decode")


def _returned(module: ModuleType, args: argparse.Namespace) -> int:
    return module.run(args)


def _up(module: ModuleType, args: argparse.Namespace) -> int:
    return module.up(args)


def _printed(print_name: str) -> Callable[[ModuleType, argparse.Namespace], int]:
    def run(module: ModuleType, args: argparse.Namespace) -> int:
        getattr(module, print_name)(module.run(args), args.json)
        return 0

    return run


@dataclass(frozen=True)
class Command:
    """A subcommand whose module is imported when it is chosen: `add` fills its parser, `run` runs it."""

    module: str
    help: str
    add: str = "add_arguments"
    run: Callable[[ModuleType, argparse.Namespace], int] = _returned


COMMANDS = {
    "up": Command("tsukimi.launcher", "start the whole system: NATS, every service, the API", add="add_up_arguments",
                  run=_up),
    "model": Command("tsukimi.model.cli", "pull a known model or convert a GGUF; list the cache"),
}
BENCHES = {
    "transfer": Command("tsukimi.bench.transfer", "transfer engine throughput between two processes",
                        run=_printed("print_result")),
    "cachestore": Command("tsukimi.bench.cachestore", "put/get throughput of the KV cache pool",
                          run=_printed("print_results")),
    "placement": Command("tsukimi.bench.placement", "time of one conductor placement decision",
                         run=_printed("print_result")),
    "serve": Command("tsukimi.bench.serve",
                     "load an OpenAI-compatible endpoint (trace replay or synthetic): TTFT, TBT, capacity"),
    "generate": Command("tsukimi.bench.vs_generate",
                        "a running server beside transformers' generate on the same prompts: TTFT, TBT, tokens/s"),
}
SIMS = {
    "cache": Command("tsukimi.sim.cache", "replay a trace's hash_ids through the pool's index"),
    "serve": Command("tsukimi.sim.serve",
                     "replay a trace through the conductor's placement on modelled prefill/decode instances"),
}
# Subcommands with subcommands of their own (`dest`: the group's name): its help, its subcommands.
GROUPS = {
    "bench": ("benchmarks that print numbers", BENCHES),
    "sim": ("simulations that run the services' own policy code", SIMS),
}


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


def _add(sub: argparse._SubParsersAction, name: str, command: Command, is_chosen: bool) -> None:
    parser = sub.add_parser(name, help=command.help)
    if is_chosen:
        getattr(importlib.import_module(command.module), command.add)(parser)


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    """The whole command line; only the chosen subcommand's module is imported to fill in its arguments.

    NOTE: neither `tsukimi` nor `tsukimi bench|sim` takes an option with a value, so the chosen names are the
    first words of `argv` that do not start with a dash."""
    words = [word for word in argv if not word.startswith("-")][:2]
    chosen, leaf = (words + [None, None])[:2]
    parser = argparse.ArgumentParser(prog="tsukimi", description="KVCache-centric disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SERVICES:
        sub.add_parser(name, help=f"run one {name} instance (configured by TSUKIMI_* env vars)")
    for name, command in COMMANDS.items():
        _add(sub, name, command, name == chosen)
    for name, (help_text, commands) in GROUPS.items():
        group = sub.add_parser(name, help=help_text).add_subparsers(dest=name, required=True)
        for leaf_name, command in commands.items():
            _add(group, leaf_name, command, name == chosen and leaf_name == leaf)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tsukimi.kvpool import grpc_defaults

    grpc_defaults.apply()  # NOTE: before anything below imports grpc (services and benchmarks alike).
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv).parse_args(argv)
    if args.command in SERVICES:
        return _run_service(args.command)
    if args.command in GROUPS:
        command = GROUPS[args.command][1][getattr(args, args.command)]
    else:
        command = COMMANDS[args.command]
    return command.run(importlib.import_module(command.module), args)


if __name__ == "__main__":
    sys.exit(main())
