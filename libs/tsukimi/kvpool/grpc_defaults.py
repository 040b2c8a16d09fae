"""gRPC core settings every tsukimi process starts with (before its first channel or server).

`GRPC_EXPERIMENTS`: grpcio 1.85's EventEngine client and listener add thread hops to every message (an I/O
callback thread, then the completion queue, then the asyncio poller). Turning those two experiments off keeps
grpc's own polling I/O: measured on the project's 2-core VMs (`python -m tsukimi.bench.session_rtt`), a
`CacheStore.Session` round trip of an empty message 279 -> 186 us, and 256 KiB batch puts / gets through the pool
5-15% faster (docs/benchmarks.md).
A `GRPC_EXPERIMENTS` already in the environment is left alone; another grpcio minor version is left alone too
(its experiments may have other names: an unknown one is logged as an error at start).
"""

from __future__ import annotations

import os
from importlib import metadata

# grpcio versions (major.minor) whose experiments these names are.
KNOWN_VERSIONS = ("1.85",)
EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def experiments_for(version: str) -> str | None:
    """The GRPC_EXPERIMENTS value for a grpcio version; None for a version it was not measured on."""
    return EXPERIMENTS if ".".join(version.split(".")[:2]) in KNOWN_VERSIONS else None


def apply(environ: dict | None = None) -> None:
    """Sets the defaults in `environ` (os.environ) where they are unset; must run before grpc starts its core."""
    environ = os.environ if environ is None else environ
    if "GRPC_EXPERIMENTS" in environ:
        return
    try:
        value = experiments_for(metadata.version("grpcio"))
    except metadata.PackageNotFoundError:
        return
    if value is not None:
        environ["GRPC_EXPERIMENTS"] = value
