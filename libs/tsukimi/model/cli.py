"""`tsukimi model pull|list`: put a known model or a GGUF file into the model cache, show what is there."""

from __future__ import annotations

import argparse
import os
import sys
import time

from tsukimi.model.catalog import CATALOG
from tsukimi.model.model_cache import ModelCache
from tsukimi.model.resolve import ModelUnavailable, resolve_model

_CACHE_ENV = "TSUKIMI_MODEL_CACHE_DIR"


def default_cache_dir() -> str:
    """The model cache `TSUKIMI_MODEL_CACHE_DIR` names, or the setting's default."""
    from tsukimi.common.settings import Settings

    return os.environ.get(_CACHE_ENV) or Settings.model_fields["model_cache_dir"].default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", required=True)
    pull = sub.add_parser("pull", help=f"fetch and convert a known model ({', '.join(sorted(CATALOG))}) or "
                                       "convert a local .gguf file, once")
    pull.add_argument("model", help="a known model's name, a .gguf file, or a directory holding one")
    listing = sub.add_parser("list", help="the models in the cache and their sizes")
    for command in (pull, listing):
        command.add_argument("--cache-dir", default=None,
                             help=f"the model cache (default ${_CACHE_ENV} or ~/.cache/tsukimi/models)")


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 20):.1f} MiB"


def run(args: argparse.Namespace) -> int:
    cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir or default_cache_dir()))
    if args.model_command == "pull":
        return pull(args.model, cache_dir)
    return show(cache_dir)


def pull(spec: str, cache_dir: str) -> int:
    """`tsukimi model pull SPEC`: 0 once the model is in the cache; 1 with one message otherwise."""
    if spec == "demo":
        print("tsukimi model pull: 'demo' is built in; there is nothing to pull", file=sys.stderr)
        return 0
    started = time.monotonic()
    try:
        directory = resolve_model(spec, cache_dir, can_pull=True)
    except ModelUnavailable as exc:
        print(f"tsukimi model pull: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tsukimi model pull: interrupted; nothing was installed", file=sys.stderr)
        return 130
    if not directory.startswith(cache_dir + os.sep):
        print(f"tsukimi model pull: {directory} is already a checkpoint directory; it is served as it is")
        return 0
    size = next((m.num_bytes for m in ModelCache(cache_dir).list() if m.path == directory), 0)
    print(f"{spec}: {directory} ({_mib(size)}, ready after {time.monotonic() - started:.1f} s)")
    return 0


def show(cache_dir: str) -> int:
    """`tsukimi model list`: one line per cached model, the kept downloads, the known models not pulled yet."""
    cache = ModelCache(cache_dir)
    models = cache.list()
    print(f"model cache: {cache.root}")
    rows = [(m.key, _mib(m.num_bytes), _source(m.manifest.get("source", {}))) for m in models]
    rows += [(name, _mib(size), "download (kept to convert again without fetching)")
             for name, size in cache.downloads()]
    pulled = {m.key for m in models}
    rows += [(e.name, "-", f"not pulled: `tsukimi model pull {e.name}` ({e.description})")
             for e in CATALOG.values() if e.name not in pulled]
    width = max(len(r[0]) for r in rows) if rows else 4
    print(f"{'NAME':<{width}}  {'SIZE':>10}  SOURCE")
    for name, size, source in rows:
        print(f"{name:<{width}}  {size:>10}  {source}")
    return 0


def _source(source: dict) -> str:
    if "requirement" in source:
        return f"{source['requirement']} ({source.get('gguf', '')})"
    return source.get("gguf", "?")
