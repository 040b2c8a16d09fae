"""Mooncake Store put/get throughput on one host: the baseline for `tsukimi bench cachestore`.

Uses the Mooncake Store shipped in the PyPI wheel `mooncake-transfer-engine-non-cuda` (the same
wheel `tsukimi.bench.mooncake` drives; `scripts/install-mooncake-bench.sh` installs it and the
Debian libibverbs1/librdmacm1/libnuma1 it loads):

* `<site-packages>/mooncake/mooncake_master`: the metadata/allocation server. Started here as

      mooncake_master --rpc_address=127.0.0.1 --rpc_port=<free> --metrics_host=127.0.0.1
          --metrics_port=<free> --enable_http_metadata_server=true
          --http_metadata_server_host=127.0.0.1 --http_metadata_server_port=<free>
          --logtostderr

  and considered ready once it logged both "Master service started on port <rpc>" and (with the
  HTTP metadata server) "HTTP metadata server started", and its RPC port accepts connections.

* `mooncake.store.MooncakeDistributedStore`: the client (pybind11, `store.so`). One client, in a
  worker subprocess (`python -m tsukimi.bench.mooncake_store --worker ...`), is set up with

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

    python -m tsukimi.bench.mooncake_store --block-size 262144 --num-blocks 256 --batch --json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tsukimi.bench.mooncake import INSTALL_HINT, WHEEL, find_wheel_binary, stop_group, tail_of
from typing import Iterable, Sequence

SYSTEM = "mooncake-store"
MASTER_BINARY = "mooncake_master"
ENV_MASTER = "TSUKIMI_MOONCAKE_MASTER"  # optional override: path to a mooncake_master binary
OPS = ("put", "get")
APIS = ("bytes", "buffer")
METADATA_MODES = ("http", "p2p")
MEMCPY_MODES = ("auto", "on", "off")
DEFAULT_BATCH_SIZE = 32
MiB = 1 << 20

# Which MooncakeDistributedStore methods each (api, batch, op) uses.
API_CALLS: dict[tuple[str, bool, str], str] = {
    ("bytes", False, "put"): "put",
    ("bytes", False, "get"): "get",
    ("bytes", True, "put"): "put_batch",
    ("bytes", True, "get"): "get_batch",
    ("buffer", False, "put"): "put_from",
    ("buffer", False, "get"): "get_into",
    ("buffer", True, "put"): "batch_put_from",
    ("buffer", True, "get"): "batch_get_into",
}

# "I1125 00:12:54.392601 13918 master.cpp:1522] Master service started on port 50551, max_threads=..."
_MASTER_RPC_RE = re.compile(r"Master service started on port (\d+)")
# "I1125 00:12:54.393599 13918 http_metadata_server.cpp:126] HTTP metadata server started on 127.0.0.1:8181"
_MASTER_HTTP_RE = re.compile(r"HTTP metadata server started on (\S+):(\d+)")
_LOADER_RE = re.compile(r"error while loading shared libraries: (\S+?):")
# glog fatal/check failures and the master's own startup errors.
_MASTER_FATAL_RE = re.compile(r"^(F\d{4} .*|.*Check failed.*|.*[Ff]ailed to (start|bind|listen).*)$", re.M)


class MooncakeStoreUnavailable(RuntimeError):
    """The Mooncake wheel, its master binary, its store module or its shared libraries are missing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MooncakeStoreBenchError(RuntimeError):
    """Mooncake Store is installed but the run failed (master down, setup/put/get error, timeout)."""


# ---------------------------------------------------------------- pure helpers (unit-tested)


def parse_master_ready(log_text: str, http_metadata: bool = True) -> dict | None:
    """{"rpc_port", "http_host", "http_port"} once the master's log shows it serving, else None.

    With `http_metadata` both the RPC line and the HTTP metadata server line are required."""
    rpc = _MASTER_RPC_RE.search(log_text)
    if not rpc:
        return None
    info: dict = {"rpc_port": int(rpc.group(1)), "http_host": None, "http_port": None}
    http = _MASTER_HTTP_RE.search(log_text)
    if http:
        info["http_host"], info["http_port"] = http.group(1), int(http.group(2))
    elif http_metadata:
        return None
    return info


def master_fatal_line(log_text: str) -> str | None:
    """The first fatal-looking line of a master log (glog F-line, CHECK failure, bind failure)."""
    m = _MASTER_FATAL_RE.search(log_text)
    return m.group(0).strip() if m else None


def loader_error(output: str) -> str | None:
    """The missing shared library named in a dynamic-loader failure, or None."""
    m = _LOADER_RE.search(output)
    return m.group(1) if m else None


def master_command(
    binary: str, rpc_port: int, metrics_port: int, http_port: int | None, host: str = "127.0.0.1"
) -> list[str]:
    """argv for mooncake_master; `http_port` None leaves the HTTP metadata server off."""
    cmd = [
        binary,
        f"--rpc_address={host}",
        f"--rpc_port={rpc_port}",
        f"--metrics_host={host}",
        f"--metrics_port={metrics_port}",
        "--logtostderr",
    ]
    if http_port is not None:
        cmd += [
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_host={host}",
            f"--http_metadata_server_port={http_port}",
        ]
    return cmd


def metadata_server_url(mode: str, host: str = "127.0.0.1", http_port: int | None = None) -> str:
    """The client's `metadata_server` argument: the master's HTTP metadata URL, or P2PHANDSHAKE."""
    if mode == "p2p":
        return "P2PHANDSHAKE"
    if mode == "http":
        if not http_port:
            raise ValueError("http metadata needs the master's http_metadata_server_port")
        return f"http://{host}:{http_port}/metadata"
    raise ValueError(f"metadata mode must be one of {METADATA_MODES}, not {mode!r}")


def memcpy_env(mode: str) -> dict[str, str]:
    """Environment for the worker: MC_STORE_MEMCPY=1/0, or nothing for the client's auto-detection."""
    if mode == "auto":
        return {}
    if mode == "on":
        return {"MC_STORE_MEMCPY": "1"}
    if mode == "off":
        return {"MC_STORE_MEMCPY": "0"}
    raise ValueError(f"memcpy mode must be one of {MEMCPY_MODES}, not {mode!r}")


def effective_batch_size(batch: bool, batch_size: int | None, num_blocks: int) -> int:
    """Keys per call: 1 without batching, else batch_size (default 32) capped at num_blocks."""
    if not batch:
        return 1
    size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if size <= 0:
        raise ValueError("batch_size must be positive")
    return max(1, min(size, num_blocks))


def segment_sizes(block_size: int, num_blocks: int, batch_size: int, api: str) -> tuple[int, int]:
    """(global_segment_size, local_buffer_size) for one client holding one round of objects.

    The segment holds num_blocks objects with 2x headroom (allocator alignment, and the master
    evicts past 90% use) plus 64 MiB, rounded up to 1 MiB. The bytes API stages every value of a
    call in the client's local buffer, so it gets 2 calls' worth plus 64 MiB; the buffer API reads
    and writes user-registered memory and only needs a small one."""
    payload = block_size * num_blocks
    segment = _round_up(2 * payload + 64 * MiB, MiB)
    if api == "bytes":
        local = _round_up(2 * block_size * batch_size + 64 * MiB, MiB)
    else:
        local = 64 * MiB
    return segment, local


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def make_keys(prefix: str, round_index: int, num_blocks: int) -> list[str]:
    """Distinct keys of one put round."""
    return [f"{prefix}/r{round_index}/b{i}" for i in range(num_blocks)]


def chunks(items: Sequence, size: int) -> list[Sequence]:
    """`items` cut into consecutive slices of at most `size`."""
    if size <= 0:
        raise ValueError("chunk size must be positive")
    return [items[i : i + size] for i in range(0, len(items), size)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of already sorted values; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_s: Iterable[float]) -> dict:
    """Per-call latency in microseconds: mean, p50, p90, p99, max."""
    values = sorted(latencies_s)
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    us = 1e6
    return {
        "mean": round(sum(values) / len(values) * us, 1),
        "p50": round(percentile(values, 50) * us, 1),
        "p90": round(percentile(values, 90) * us, 1),
        "p99": round(percentile(values, 99) * us, 1),
        "max": round(values[-1] * us, 1),
    }


def throughput(ops: int, block_size: int, elapsed_s: float) -> tuple[float, float]:
    """(ops/s, GB/s of 1e9 bytes/s) for `ops` objects of `block_size` bytes in `elapsed_s`."""
    if elapsed_s <= 0:
        raise ValueError("elapsed_s must be positive")
    return ops / elapsed_s, ops * block_size / elapsed_s / 1e9


def make_result(
    op: str,
    block_size: int,
    batch: bool,
    batch_size: int,
    ops: int,
    calls: int,
    elapsed_s: float,
    latencies_s: Iterable[float],
    api: str,
    **extra,
) -> dict:
    """One result record in the shape `tsukimi bench cachestore` compares."""
    ops_per_s, gb_per_s = throughput(ops, block_size, elapsed_s)
    return {
        "system": SYSTEM,
        "op": op,
        "block_size": block_size,
        "batch": batch,
        "batch_size": batch_size,
        "ops_per_s": round(ops_per_s, 1),
        "gb_per_s": round(gb_per_s, 4),
        "ops": ops,
        "calls": calls,
        "bytes": ops * block_size,
        "elapsed_s": round(elapsed_s, 4),
        "call_latency_us": latency_summary(latencies_s),
        "api": api,
        "calls_used": API_CALLS[(api, batch, op)],
        **extra,
    }


def check_status(what: str, status) -> None:
    """Raise MooncakeStoreBenchError unless a store return value means success.

    put/put_batch/put_from return an int (0 = ok, negative = error code); batch_put_from a list
    of them; get_into/batch_get_into return byte counts (negative = error)."""
    values = status if isinstance(status, (list, tuple)) else [status]
    bad = [v for v in values if not isinstance(v, int) or v < 0]
    if bad:
        raise MooncakeStoreBenchError(f"{what} failed: return value(s) {bad[:8]}")


# ---------------------------------------------------------------- locating the pieces


def find_master_binary() -> Path:
    """Path of `mooncake_master`: $TSUKIMI_MOONCAKE_MASTER, else the one in the mooncake wheel."""
    path = find_wheel_binary(MASTER_BINARY, ENV_MASTER, MooncakeStoreUnavailable)
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError as exc:
            raise MooncakeStoreUnavailable(f"{path} is not executable: {exc}") from exc
    return path


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


# ---------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_for_master(proc: subprocess.Popen, log: Path, http_metadata: bool, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        info = parse_master_ready(text, http_metadata=http_metadata)
        if info is not None and _port_open(info["rpc_port"]):
            if not http_metadata or _port_open(info["http_port"]):
                return info
        if proc.poll() is not None:
            missing = loader_error(text)
            if missing:
                raise MooncakeStoreUnavailable(f"mooncake_master cannot load {missing}; {INSTALL_HINT}")
            fatal = master_fatal_line(text)
            raise MooncakeStoreBenchError(
                f"mooncake_master exited with {proc.returncode} before it was ready"
                f"{': ' + fatal if fatal else ''}:\n{text[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise MooncakeStoreBenchError(f"mooncake_master not ready after {timeout_s:.0f} s:\n{text[-2000:]}")
        time.sleep(0.05)


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

    http_port = _free_port() if metadata == "http" else None
    cmd = master_command(str(master_bin), _free_port(), _free_port(), http_port)
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
            info = _wait_for_master(master, master_log, metadata == "http", startup_timeout_s)
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
            env = {**os.environ, **env_extra}
            with open(worker_log, "wb") as sink:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "tsukimi.bench.mooncake_store", "--worker", json.dumps(spec)],
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


# ---------------------------------------------------------------- the worker (inside the client process)


class _Buffers:
    """Source and destination memory for the buffer API: anonymous mmaps, registered with the store."""

    def __init__(self, store, size: int):
        import ctypes
        import mmap

        self.store = store
        self.size = size
        self.src = mmap.mmap(-1, size)
        self.dst = mmap.mmap(-1, size)
        self.src_ptr = ctypes.addressof(ctypes.c_char.from_buffer(self.src))
        self.dst_ptr = ctypes.addressof(ctypes.c_char.from_buffer(self.dst))
        for ptr in (self.src_ptr, self.dst_ptr):
            rc = store.register_buffer(ptr, size)
            if rc != 0:
                raise MooncakeStoreBenchError(f"register_buffer({size}) returned {rc}")

    def unregister(self) -> None:
        for ptr in (self.src_ptr, self.dst_ptr):
            try:
                self.store.unregister_buffer(ptr)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass


def _worker(spec: dict) -> list[dict]:
    from mooncake.store import MooncakeDistributedStore

    block_size = spec["block_size"]
    num_blocks = spec["num_blocks"]
    batch = spec["batch"]
    bsize = spec["batch_size"]
    duration_s = spec["duration_s"]
    api = spec["api"]
    segment, local = segment_sizes(block_size, num_blocks, bsize, api)

    store = MooncakeDistributedStore()
    rc = store.setup(
        "127.0.0.1", spec["metadata_server"], segment, local, "tcp", "", spec["master_addr"]
    )
    if rc != 0:
        raise MooncakeStoreBenchError(f"MooncakeDistributedStore.setup returned {rc}")

    # Distinct payloads per block (cheap to build: a 4 KiB random pattern tiled, then a per-block
    # header) so a get that returns the wrong object is caught by the content check.
    pattern = os.urandom(4096)
    base = (pattern * (block_size // 4096 + 1))[:block_size]

    def payload(i: int) -> bytes:
        head = f"{i:016d}".encode()[:block_size]
        return head + base[len(head) :]

    values = [payload(i) for i in range(num_blocks)]
    bufs: _Buffers | None = None
    if api == "buffer":
        bufs = _Buffers(store, block_size * num_blocks)
        for i, v in enumerate(values):
            bufs.src[i * block_size : (i + 1) * block_size] = v
    prefix = f"tsk-{uuid.uuid4().hex[:8]}"
    groups = chunks(list(range(num_blocks)), bsize)
    num_threads = spec.get("threads", 1)
    executor = concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def each_group(call) -> None:
        # The round's batch calls: in order on this thread, or `threads` at once (list() re-raises a failure).
        if executor is None:
            for idx in groups:
                call(idx)
        else:
            list(executor.map(call, groups))

    def put_round(keys: list[str], latencies: list[float] | None) -> None:
        each_group(lambda idx: put_group(keys, idx, latencies))

    def put_group(keys: list[str], idx: list[int], latencies: list[float] | None) -> None:
        ks = [keys[i] for i in idx]
        t0 = time.perf_counter()
        if api == "bytes":
            if batch:
                st = store.put_batch(ks, [values[i] for i in idx])
            else:
                st = store.put(ks[0], values[idx[0]])
        else:
            if batch:
                st = store.batch_put_from(
                    ks, [bufs.src_ptr + i * block_size for i in idx], [block_size] * len(idx)
                )
            else:
                st = store.put_from(ks[0], bufs.src_ptr + idx[0] * block_size, block_size)
        if latencies is not None:
            latencies.append(time.perf_counter() - t0)
        check_status(API_CALLS[(api, batch, "put")], st)

    def get_round(keys: list[str], latencies: list[float], verify: bool) -> None:
        each_group(lambda idx: get_group(keys, idx, latencies, verify))

    def get_group(keys: list[str], idx: list[int], latencies: list[float], verify: bool) -> None:
        ks = [keys[i] for i in idx]
        t0 = time.perf_counter()
        if api == "bytes":
            got = store.get_batch(ks) if batch else [store.get(ks[0])]
            latencies.append(time.perf_counter() - t0)
            sizes = [len(g) for g in got]
        else:
            if batch:
                sizes = store.batch_get_into(
                    ks, [bufs.dst_ptr + i * block_size for i in idx], [block_size] * len(idx)
                )
            else:
                sizes = [store.get_into(ks[0], bufs.dst_ptr + idx[0] * block_size, block_size)]
            latencies.append(time.perf_counter() - t0)
            got = None
        if any(s != block_size for s in sizes):
            raise MooncakeStoreBenchError(
                f"{API_CALLS[(api, batch, 'get')]} returned sizes {sizes[:8]} for {block_size}-byte objects"
            )
        if verify:
            for j, i in enumerate(idx):
                data = got[j] if got is not None else bufs.dst[i * block_size : (i + 1) * block_size]
                if data != values[i]:
                    raise MooncakeStoreBenchError(f"get of {ks[j]} returned wrong content")

    results: list[dict] = []
    live_keys: list[str] | None = None
    round_index = 0
    try:
        for op in spec["ops"]:
            latencies: list[float] = []
            done = 0
            rounds = 0
            if op == "put":
                elapsed = 0.0
                while elapsed < duration_s:
                    if live_keys is not None:
                        check_status("batch_remove", store.batch_remove(live_keys, True))
                    keys = make_keys(prefix, round_index, num_blocks)
                    round_index += 1
                    t0 = time.perf_counter()
                    put_round(keys, latencies)
                    elapsed += time.perf_counter() - t0
                    live_keys = keys
                    done += num_blocks
                    rounds += 1
            else:
                if live_keys is None:
                    live_keys = make_keys(prefix, round_index, num_blocks)
                    round_index += 1
                    put_round(live_keys, None)
                get_round(live_keys, [], verify=True)  # warm-up + full content check, untimed
                t_start = time.perf_counter()
                while time.perf_counter() - t_start < duration_s:
                    get_round(live_keys, latencies, verify=False)
                    done += num_blocks
                    rounds += 1
                elapsed = time.perf_counter() - t_start
            results.append(
                make_result(
                    op, block_size, batch, bsize, done, len(latencies), elapsed, latencies, api,
                    num_blocks=num_blocks, rounds=rounds, duration_s=duration_s, threads=num_threads,
                )
            )
    finally:
        if live_keys is not None:
            try:
                store.batch_remove(live_keys, True)
            except Exception:  # noqa: BLE001
                pass
        if executor is not None:
            executor.shutdown()
        if bufs is not None:
            bufs.unregister()
        store.close()
    return results


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    out = Path(spec["result_file"])
    try:
        results = _worker(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent through the result file
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    out.write_text(json.dumps(results))
    sys.stdout.flush()
    sys.stderr.flush()
    # The store's C++ threads have been seen to linger after close(); skip interpreter teardown.
    os._exit(0)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsukimi.bench.mooncake_store",
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
        return _worker_main(args.worker)
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
