"""Mooncake Transfer Engine's own TCP benchmark, run on loopback as a baseline for tsukimi's engine.

Runs `transfer_engine_bench`, the C++ example binary shipped inside the PyPI wheel
`mooncake-transfer-engine-non-cuda` (at `<site-packages>/mooncake/transfer_engine_bench`; the
`transfer_engine_bench` console script in `bin/` is only a Python wrapper around it), as two
processes on 127.0.0.1:

    target:    transfer_engine_bench --mode=target --protocol=tcp --metadata_server=P2PHANDSHAKE
                   --local_server_name=127.0.0.1:<port> --buffer_size=...
    initiator: transfer_engine_bench --mode=initiator --protocol=tcp --metadata_server=P2PHANDSHAKE
                   --local_server_name=127.0.0.1:<port> --segment_id=127.0.0.1:<target RPC port>
                   --operation=read|write --block_size=... --batch_size=... --threads=...
                   --duration=... --report_unit=GB --report_precision=4

With P2PHANDSHAKE the port in the target's `--local_server_name` is NOT where it listens: the
engine binds a random RPC port and logs it as

    ... transfer_engine_impl.cpp:183] Transfer Engine RPC using P2P handshake, listening on 127.0.0.1:16171

and the initiator must name the target segment by that address. The initiator ends with

    ... transfer_engine_bench.cpp:569] Test completed: duration 3.03, batch count 94, throughput 1.04 GB/s

where the rate is batch_count * batch_size * block_size / duration in `--report_unit`; "GB" is
1e9 bytes (the bench's table: GB=1e9, GiB=2^30, Gb=1e9/8, MB=1e6, MiB=2^20, Mb=1e6/8, KB, KiB, Kb).
Both processes log through glog to stderr (InitGoogleLogging is never called; `--logtostderr` is
passed anyway). The wheel needs Debian's libibverbs1, librdmacm1 and libnuma1 to load:
`scripts/install-mooncake-bench.sh` installs all of it.

    python -m tsukimi.bench.mooncake --op write --block-size 1048576 --batch-size 32 --threads 2 \
        --duration 5 --json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BINARY_NAME = "transfer_engine_bench"
ENV_BINARY = "TSUKIMI_MOONCAKE_BENCH"  # optional override: path to a transfer_engine_bench binary
WHEEL = "mooncake-transfer-engine-non-cuda"
INSTALL_HINT = f"run scripts/install-mooncake-bench.sh (apt: libibverbs1 librdmacm1 libnuma1; pip: {WHEEL})"

# transfer_engine_bench.cpp's RATE_UNIT_MP: bytes per unit of `--report_unit`.
RATE_UNITS: dict[str, float] = {
    "GB": 1e9,
    "GiB": float(1 << 30),
    "Gb": 1e9 / 8,
    "MB": 1e6,
    "MiB": float(1 << 20),
    "Mb": 1e6 / 8,
    "KB": 1e3,
    "KiB": float(1 << 10),
    "Kb": 1e3 / 8,
}

# "Transfer Engine RPC using P2P handshake, listening on 127.0.0.1:16171"; older builds may log an
# empty host ("listening on :16683"), an IPv6 one may be bracketed ("[::1]:16171").
_RPC_RE = re.compile(r"RPC using P2P handshake, listening on (\[[^\]]*\]|[^\s:]*):(\d+)")
# "Test completed: duration 3.03, batch count 94, throughput 1.04 GB/s"
_RESULT_RE = re.compile(
    r"Test completed: duration (?P<duration>[\d.]+), batch count (?P<batches>\d+), "
    r"throughput (?P<rate>[\d.]+) (?P<unit>[A-Za-z]+)/s"
)
# Logged by the target after the transport is installed, right before it allocates and registers
# its buffers (there is no log line after registration).
_TARGET_BUFFERS_RE = re.compile(r"(DRAM|VRAM) is used")
_LOADER_RE = re.compile(r"error while loading shared libraries: (\S+?):")


class MooncakeUnavailable(RuntimeError):
    """The Mooncake wheel, its binary or the shared libraries it loads are missing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MooncakeBenchError(RuntimeError):
    """The bench ran but failed (target never came up, initiator exited non-zero, no result line)."""


# ---------------------------------------------------------------- parsers (pure, unit-tested)


def parse_rpc_endpoint(log_text: str) -> tuple[str, int] | None:
    """(host, port) of the P2P-handshake RPC listener a transfer engine logged, or None.

    The host is as logged ("" when the engine logged none, brackets stripped for IPv6)."""
    m = _RPC_RE.search(log_text)
    if not m:
        return None
    return m.group(1).strip("[]"), int(m.group(2))


def parse_rpc_port(log_text: str) -> int | None:
    """The RPC port of the P2P-handshake listener in a target's log: the initiator's segment_id port."""
    endpoint = parse_rpc_endpoint(log_text)
    return endpoint[1] if endpoint else None


def target_buffers_started(log_text: str) -> bool:
    """Whether the target has reached buffer allocation (logged just before it registers memory)."""
    return _TARGET_BUFFERS_RE.search(log_text) is not None


def to_gb_per_s(value: float, unit: str) -> float:
    """A rate printed by the bench in `unit`/s (e.g. "GB", "MiB", "Gb") as GB/s of 1e9 bytes/s."""
    unit = unit.removesuffix("/s")
    if unit not in RATE_UNITS:
        raise ValueError(f"unknown transfer_engine_bench rate unit {unit!r}")
    return value * RATE_UNITS[unit] / 1e9


def parse_throughput(output: str) -> dict | None:
    """The initiator's result line, or None when absent.

    Returns {"duration_s", "batch_count", "rate", "unit", "gb_per_s", "raw"}; gb_per_s is the
    printed rate converted to 1e9 bytes/s, and raw the whole log line holding it."""
    for line in output.splitlines():
        m = _RESULT_RE.search(line)
        if m:
            rate = float(m.group("rate"))
            unit = m.group("unit")
            return {
                "duration_s": float(m.group("duration")),
                "batch_count": int(m.group("batches")),
                "rate": rate,
                "unit": f"{unit}/s",
                "gb_per_s": to_gb_per_s(rate, unit),
                "raw": line.strip(),
            }
    return None


def loader_error(output: str) -> str | None:
    """The missing shared library named in a dynamic-loader failure, or None."""
    m = _LOADER_RE.search(output)
    return m.group(1) if m else None


# ---------------------------------------------------------------- locating the binary


def find_wheel_binary(name: str, env_var: str, unavailable: type[Exception] = None) -> Path:
    """Path of the executable `name`: $`env_var` when set, else the one shipped in the mooncake wheel.

    Raises `unavailable` (default MooncakeUnavailable) when neither exists. Does not import `mooncake` (its
    extension modules need the same system libraries)."""
    unavailable = unavailable or MooncakeUnavailable
    override = os.environ.get(env_var)
    if override:
        path = Path(override)
        if not path.is_file():
            raise unavailable(f"${env_var}={override} is not a file")
        return path
    try:
        spec = importlib.util.find_spec("mooncake")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise unavailable(f"Python package 'mooncake' not installed ({WHEEL}); {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / name
        if path.is_file():
            return path
    raise unavailable(
        f"{name} not found in {list(spec.submodule_search_locations)} "
        f"(is the installed mooncake a wheel that ships it? expected {WHEEL}); {INSTALL_HINT}"
    )


def find_bench_binary() -> Path:
    """Path of `transfer_engine_bench`: $TSUKIMI_MOONCAKE_BENCH, else the one in the mooncake wheel."""
    return find_wheel_binary(BINARY_NAME, ENV_BINARY)


def check_binary(path: Path) -> None:
    """Run `<bench> --version` to prove the binary loads; MooncakeUnavailable if it cannot."""
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError as exc:
            raise MooncakeUnavailable(f"{path} is not executable: {exc}") from exc
    try:
        proc = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except OSError as exc:
        raise MooncakeUnavailable(f"cannot execute {path}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise MooncakeUnavailable(f"{path} --version hung for 30 s") from exc
    if proc.returncode != 0:
        missing = loader_error(proc.stderr + proc.stdout)
        if missing:
            raise MooncakeUnavailable(f"{path} cannot load shared library {missing}; {INSTALL_HINT}")
        tail = (proc.stderr or proc.stdout).strip()[-500:]
        raise MooncakeUnavailable(f"{path} --version exited {proc.returncode}: {tail}")


# ---------------------------------------------------------------- running


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group (the target exits cleanly on it), SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)  # started with start_new_session: pgid == pid
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def tail_of(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _wait_for_target(proc: subprocess.Popen, log: Path, timeout_s: float) -> int:
    """Poll the target's log until it shows its RPC port and has reached buffer allocation."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        port = parse_rpc_port(text)
        if port is not None and target_buffers_started(text):
            return port
        if proc.poll() is not None:
            missing = loader_error(text)
            if missing:
                raise MooncakeUnavailable(f"cannot load shared library {missing}; {INSTALL_HINT}")
            raise MooncakeBenchError(
                f"target exited with {proc.returncode} before it was ready:\n{text[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise MooncakeBenchError(f"target not ready after {timeout_s:.0f} s:\n{text[-2000:]}")
        time.sleep(0.05)


def run_mooncake_bench(
    op: str = "write",
    block_size: int = 1 << 20,
    batch_size: int = 32,
    threads: int = 2,
    duration_s: int = 5,
    buffer_size: int = 1 << 30,
    *,
    settle_s: float = 1.0,
    startup_timeout_s: float = 30.0,
) -> dict:
    """Run Mooncake's transfer_engine_bench over TCP on loopback and return its throughput.

    `op` is the initiator's operation: "write" pushes its buffer into the target's, "read" pulls.
    `settle_s` is waited after the target logs buffer allocation, because it logs nothing once its
    memory is registered and an initiator that fetches the segment descriptor too early sees no
    buffers. Raises MooncakeUnavailable when the wheel or its libraries are missing, and
    MooncakeBenchError when the run itself fails."""
    if op not in ("read", "write"):
        raise ValueError("op must be 'read' or 'write'")
    if min(block_size, batch_size, threads, duration_s) <= 0:
        raise ValueError("block_size, batch_size, threads and duration_s must be positive")
    binary = find_bench_binary()
    check_binary(binary)
    # The bench grows buffer_size itself if block*batch*threads does not fit; mirror that here.
    buffer_size = max(buffer_size, block_size * batch_size * threads)
    common = [
        "--protocol=tcp",
        "--metadata_server=P2PHANDSHAKE",
        f"--buffer_size={buffer_size}",
        "--logtostderr",
    ]
    with tempfile.TemporaryDirectory(prefix="tsukimi-mooncake-bench-") as tmp:
        target_log = Path(tmp) / "target.log"
        with open(target_log, "wb") as sink:
            target = subprocess.Popen(
                [str(binary), "--mode=target", f"--local_server_name=127.0.0.1:{_free_port()}", *common],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=tmp,
            )
        initiator: subprocess.Popen | None = None
        try:
            rpc_port = _wait_for_target(target, target_log, startup_timeout_s)
            time.sleep(settle_s)
            if target.poll() is not None:
                raise MooncakeBenchError(f"target exited with {target.returncode}:\n{tail_of(target_log)}")
            segment_id = f"127.0.0.1:{rpc_port}"
            cmd = [
                str(binary),
                "--mode=initiator",
                f"--local_server_name=127.0.0.1:{_free_port()}",
                f"--segment_id={segment_id}",
                f"--operation={op}",
                f"--block_size={block_size}",
                f"--batch_size={batch_size}",
                f"--threads={threads}",
                f"--duration={duration_s}",
                "--report_unit=GB",
                "--report_precision=4",
                *common,
            ]
            initiator = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
                cwd=tmp,
            )
            try:
                output, _ = initiator.communicate(timeout=duration_s + 60)
            except subprocess.TimeoutExpired:
                stop_group(initiator)
                output, _ = initiator.communicate()
                raise MooncakeBenchError(
                    f"initiator did not finish in {duration_s + 60} s:\n{output[-2000:]}"
                )
            if initiator.returncode != 0:
                raise MooncakeBenchError(
                    f"initiator exited with {initiator.returncode}:\n{output[-2000:]}\n"
                    f"--- target log ---\n{tail_of(target_log)}"
                )
            parsed = parse_throughput(output)
            if parsed is None:
                raise MooncakeBenchError(
                    f"no 'Test completed' line in the initiator's output:\n{output[-2000:]}"
                )
        finally:
            if initiator is not None:
                stop_group(initiator)
            stop_group(target)
    moved = parsed["batch_count"] * batch_size * block_size
    return {
        "system": "mooncake",
        "transport": "tcp",
        "op": op,
        "block_size": block_size,
        "batch_size": batch_size,
        "threads": threads,
        "duration_s": parsed["duration_s"],
        "gb_per_s": parsed["gb_per_s"],
        "raw": parsed["raw"],
        "batch_count": parsed["batch_count"],
        "bytes": moved,
        # The same rate from the counted bytes (the log's duration has 2 decimals): a cross-check.
        "gb_per_s_from_count": moved / parsed["duration_s"] / 1e9 if parsed["duration_s"] else None,
        "buffer_size": buffer_size,
        "segment_id": segment_id,
        "binary": str(binary),
        "command": " ".join(cmd),
        "loadavg_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsukimi.bench.mooncake",
        description="Mooncake transfer_engine_bench over TCP on loopback (throughput in GB/s = 1e9 B/s).",
    )
    parser.add_argument("--op", choices=("read", "write"), default="write")
    parser.add_argument("--block-size", type=int, default=1 << 20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--duration", type=int, default=5, help="seconds (an integer: the bench sleeps that long)"
    )
    parser.add_argument("--buffer-size", type=int, default=1 << 30)
    parser.add_argument("--repeat", type=int, default=1, help="runs, one result (JSON line) each")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = parser.parse_args(argv)
    # SIGTERM -> SystemExit so run_mooncake_bench's cleanup stops both bench processes (they run in
    # their own sessions, so neither a terminal's Ctrl-C nor a kill of this process reaches them).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for _ in range(max(1, args.repeat)):
        try:
            result = run_mooncake_bench(
                op=args.op,
                block_size=args.block_size,
                batch_size=args.batch_size,
                threads=args.threads,
                duration_s=args.duration,
                buffer_size=args.buffer_size,
            )
        except MooncakeUnavailable as exc:
            print(f"mooncake unavailable: {exc.reason}", file=sys.stderr)
            return 2
        except MooncakeBenchError as exc:
            print(f"mooncake bench failed: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"mooncake tcp {result['op']} block {result['block_size']} batch {result['batch_size']} "
                f"threads {result['threads']}: {result['gb_per_s']:.3f} GB/s over {result['duration_s']} s"
            )
            print(f"  {result['raw']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
