"""Mooncake Store put/get throughput on one host: the baseline for `tsukimi bench cachestore`.

Uses the Mooncake Store shipped in the PyPI wheel `mooncake-transfer-engine-non-cuda` (the same
wheel `harness.mooncake.engine` drives; `scripts/install-mooncake-bench.sh` installs it and the
Debian libibverbs1/librdmacm1/libnuma1 it loads):

* `<site-packages>/mooncake/mooncake_master`: the metadata/allocation server. Started here as

      mooncake_master --rpc_address=127.0.0.1 --rpc_port=<free> --metrics_host=127.0.0.1
          --metrics_port=<free> --enable_http_metadata_server=true
          --http_metadata_server_host=127.0.0.1 --http_metadata_server_port=<free>
          --logtostderr

  and considered ready once it logged both "Master service started on port <rpc>" and (with the
  HTTP metadata server) "HTTP metadata server started", and its RPC port accepts connections.

* `mooncake.store.MooncakeDistributedStore`: the client (pybind11, `store.so`). One client, in a
  worker subprocess (`python -m harness.mooncake.store --worker ...`), is set up with

      setup(local_hostname="127.0.0.1", metadata_server="http://127.0.0.1:<http>/metadata",
            global_segment_size=<segment>, local_buffer_size=<buffer>, protocol="tcp",
            rdma_devices="", master_server_addr="127.0.0.1:<rpc>")

  (metadata_server="P2PHANDSHAKE" also works: `--metadata p2p`). It mounts a global segment of
  `global_segment_size` bytes into the store, so every object lands in this same process.

Measured, per op, for `duration_s` seconds each:

* put: distinct keys, `num_blocks` per round; between rounds the round's keys are removed
  (`batch_remove(force=True)`, untimed) so the segment never fills and nothing is evicted.
* get: on the keys of the last put round, cycling over them; the first pass checks the length
  (and the content of the first object).

API ("--api"):

* bytes (default): single `put(key, bytes)` / `get(key) -> bytes`; batch `put_batch(keys, values)
  -> int` / `get_batch(keys) -> list[bytes]`. Every get allocates a Python bytes object.
* buffer: zero-copy into/out of a buffer registered with `register_buffer(ptr, size)`: single
  `put_from(key, ptr, size)` / `get_into(key, ptr, size)`; batch `batch_put_from(keys, ptrs,
  sizes) -> list[int]` / `batch_get_into(keys, ptrs, sizes) -> list[int]`.

Batch calls carry `batch_size` keys each (default 32, capped at num_blocks).

PITFALL: with protocol tcp, the client detects a "TCP-only environment" and enables memcpy for
objects in its own segment (log: "MC_STORE_MEMCPY not set, auto-detected: TCP-only environment,
memcpy enabled"). With one process every object is local, so by default the numbers measure
Mooncake's metadata RPC to the master + a memcpy, not the TCP transport. `--memcpy off` sets
MC_STORE_MEMCPY=0 in the worker to force the transfer engine's TCP path over loopback.

GB/s is 1e9 bytes/s of payload. Results, one dict per op:

    {"system": "mooncake-store", "op": "put"|"get", "block_size", "batch", "batch_size",
     "ops_per_s", "gb_per_s", "ops", "calls", "bytes", "elapsed_s", "call_latency_us": {...},
     "api", "calls_used", "memcpy", "metadata", "rounds", ...}

    python -m harness.mooncake.store --block-size 262144 --num-blocks 256 --batch --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from harness.mooncake.store_master import find_master_binary, master_command, wait_for_master
from harness.mooncake.store_spec import (
    APIS,
    DEFAULT_BATCH_SIZE,
    MEMCPY_MODES,
    METADATA_MODES,
    OPS,
    MooncakeStoreBenchError,
    MooncakeStoreUnavailable,
    effective_batch_size,
    memcpy_env,
    metadata_server_url,
    segment_sizes,
)
from harness.mooncake.wheel import INSTALL_HINT, free_port, loader_error, stop_group, tail_of

# The repository root: the worker runs in a temporary directory and finds the harness through PYTHONPATH.
ROOT = Path(__file__).resolve().parents[2]


def check_store_module(python: str = sys.executable) -> None:
    """Prove `from mooncake.store import MooncakeDistributedStore` works (in a subprocess, since a
    failing extension import can leave the interpreter in a bad state)."""
    code = "from mooncake.store import MooncakeDistributedStore; MooncakeDistributedStore()"
    try:
        proc = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MooncakeStoreUnavailable(f"cannot import mooncake.store: {exc}") from exc
    if proc.returncode != 0:
        out = proc.stderr + proc.stdout
        missing = loader_error(out) or _import_missing_lib(out)
        if missing:
            raise MooncakeStoreUnavailable(f"mooncake.store cannot load {missing}; {INSTALL_HINT}")
        raise MooncakeStoreUnavailable(f"cannot import mooncake.store: {out.strip()[-500:]}")


def _import_missing_lib(output: str) -> str | None:
    # ImportError: libibverbs.so.1: cannot open shared object file: No such file or directory
    m = re.search(r"ImportError: (\S+?): cannot open shared object file", output)
    return m.group(1) if m else None


def run_mooncake_store_ops(
    block_size: int,
    num_blocks: int,
    batch: bool,
    duration_s: float,
    *,
    ops: Sequence[str] = OPS,
    batch_size: int | None = None,
    api: str = "bytes",
    memcpy: str = "auto",
    metadata: str = "http",
    startup_timeout_s: float = 30.0,
    threads: int = 1,
) -> list[dict]:
    """Start a master and one store client (worker subprocess); measure each op in `ops` in order. With
    `threads` > 1 the client makes that many calls at once (threads taking the batches of a round in turn: the
    counterpart of `tsukimi bench cachestore --inflight`).

    "get" without a preceding "put" does an untimed put round first. Returns one result dict per
    op. Raises MooncakeStoreUnavailable / MooncakeStoreBenchError."""
    if min(block_size, num_blocks, threads) <= 0 or duration_s <= 0:
        raise ValueError("block_size, num_blocks, threads and duration_s must be positive")
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}")
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}")
    if metadata not in METADATA_MODES:
        raise ValueError(f"metadata must be one of {METADATA_MODES}")
    env_extra = memcpy_env(memcpy)
    bsize = effective_batch_size(batch, batch_size, num_blocks)
    master_bin = find_master_binary()
    check_store_module()

    http_port = free_port() if metadata == "http" else None
    cmd = master_command(str(master_bin), free_port(), free_port(), http_port)
    with tempfile.TemporaryDirectory(prefix="tsukimi-mooncake-store-") as tmp:
        master_log = Path(tmp) / "master.log"
        worker_log = Path(tmp) / "worker.log"
        result_file = Path(tmp) / "result.json"
        with open(master_log, "wb") as sink:
            master = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=tmp,
            )
        worker: subprocess.Popen | None = None
        try:
            info = wait_for_master(master, master_log, metadata == "http", startup_timeout_s)
            spec = {
                "block_size": block_size,
                "num_blocks": num_blocks,
                "batch": batch,
                "batch_size": bsize,
                "duration_s": duration_s,
                "ops": list(ops),
                "api": api,
                "threads": threads,
                "master_addr": f"127.0.0.1:{info['rpc_port']}",
                "metadata_server": metadata_server_url(metadata, "127.0.0.1", info["http_port"]),
                "result_file": str(result_file),
            }
            pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            env = {**os.environ, **env_extra, "PYTHONPATH": pythonpath}
            with open(worker_log, "wb") as sink:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "harness.mooncake.store", "--worker", json.dumps(spec)],
                    stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                    start_new_session=True, cwd=tmp, env=env,
                )
            timeout = startup_timeout_s + len(ops) * duration_s * 2 + 120
            try:
                rc = worker.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise MooncakeStoreBenchError(
                    f"store worker did not finish in {timeout:.0f} s:\n{tail_of(worker_log)}"
                )
            results = json.loads(result_file.read_text()) if result_file.exists() else None
            if isinstance(results, dict) and "error" in results:
                raise MooncakeStoreBenchError(
                    f"store worker failed: {results['error']}\n--- worker log ---\n{tail_of(worker_log)}"
                    f"\n--- master log ---\n{tail_of(master_log, 1000)}"
                )
            if rc != 0 and not results:
                raise MooncakeStoreBenchError(
                    f"store worker exited with {rc}:\n{tail_of(worker_log)}\n--- master log ---\n{tail_of(master_log, 1000)}"
                )
            if not isinstance(results, list):
                raise MooncakeStoreBenchError(f"store worker wrote no results (rc {rc}):\n{tail_of(worker_log)}")
            segment, local = segment_sizes(block_size, num_blocks, bsize, api)
            for r in results:
                r.update(
                    memcpy=memcpy,
                    metadata=metadata,
                    metadata_server=spec["metadata_server"],
                    global_segment_size=segment,
                    local_buffer_size=local,
                    master_command=" ".join(cmd),
                    worker_exit=rc,
                    memcpy_log=_memcpy_log_line(worker_log),
                    loadavg_1m=os.getloadavg()[0],
                )
            return results
        finally:
            if worker is not None:
                stop_group(worker)
            stop_group(master)


def _memcpy_log_line(worker_log: Path) -> str | None:
    """The client's MC_STORE_MEMCPY decision as logged (tells whether local objects bypass TCP)."""
    for line in tail_of(worker_log, 200_000).splitlines():
        if "MC_STORE_MEMCPY" in line or ("transfer_task.cpp" in line and "memcpy" in line.lower()):
            return line.split("] ", 1)[-1].strip()
    return None


def run_mooncake_store_bench(
    block_size: int,
    num_blocks: int,
    batch: bool,
    duration_s: float,
    *,
    op: str = "put",
    **kwargs,
) -> dict:
    """One op ("put" or "get") of Mooncake Store; see run_mooncake_store_ops for keyword options.

    Each call starts its own master and client; use run_mooncake_store_ops to measure put and get
    in one session."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}")
    return run_mooncake_store_ops(block_size, num_blocks, batch, duration_s, ops=(op,), **kwargs)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.mooncake.store",
        description="Mooncake Store put/get throughput, one master + one tcp client on this host "
        "(GB/s = 1e9 B/s of payload).",
    )
    parser.add_argument("--block-size", type=int, default=256 * 1024)
    parser.add_argument("--num-blocks", type=int, default=256, help="distinct keys per put round")
    parser.add_argument("--batch", action="store_true", help="use the batch calls")
    parser.add_argument("--batch-size", type=int, default=None, help=f"keys per batch call (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per op")
    parser.add_argument("--ops", default="put,get", help="comma-separated, in order: put,get")
    parser.add_argument("--api", choices=APIS, default="bytes")
    parser.add_argument("--memcpy", choices=MEMCPY_MODES, default="auto",
                        help="MC_STORE_MEMCPY for the client: off forces local objects over TCP")
    parser.add_argument("--metadata", choices=METADATA_MODES, default="http")
    parser.add_argument("--repeat", type=int, default=1, help="sessions, each a fresh master + client")
    parser.add_argument("--threads", type=int, default=1, help="batch calls at once (threads of the client)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per op and run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from harness.mooncake.store_worker import worker_main

        return worker_main(args.worker)
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for run in range(max(1, args.repeat)):
        try:
            results = run_mooncake_store_ops(
                args.block_size, args.num_blocks, args.batch, args.duration, ops=ops,
                batch_size=args.batch_size, api=args.api, memcpy=args.memcpy, metadata=args.metadata,
                threads=args.threads,
            )
        except MooncakeStoreUnavailable as exc:
            print(f"mooncake store unavailable: {exc.reason}", file=sys.stderr)
            return 2
        except MooncakeStoreBenchError as exc:
            print(f"mooncake store bench failed: {exc}", file=sys.stderr)
            return 1
        for r in results:
            r["run"] = run
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                lat = r["call_latency_us"]
                print(
                    f"mooncake-store {r['op']:3} block {r['block_size']} {r['calls_used']} x{r['batch_size']}: "
                    f"{r['ops_per_s']:.0f} ops/s {r['gb_per_s']:.3f} GB/s "
                    f"(call p50 {lat['p50']} us p99 {lat['p99']} us, {r['ops']} ops in {r['elapsed_s']} s)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
