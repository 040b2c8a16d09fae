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

The log lines it reads back (the target's RPC port, the initiator's result) are in `harness.mooncake.engine_log`.
Both processes log through glog to stderr (InitGoogleLogging is never called; `--logtostderr` is
passed anyway). The wheel needs Debian's libibverbs1, librdmacm1 and libnuma1 to load:
`scripts/install-mooncake-bench.sh` installs all of it.

    python -m harness.mooncake.engine --op write --block-size 1048576 --batch-size 32 --threads 2 \
        --duration 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.mooncake.engine_log import parse_rpc_port, parse_throughput, target_buffers_started
from harness.mooncake.wheel import (
    INSTALL_HINT,
    MooncakeUnavailable,
    find_wheel_binary,
    free_port,
    loader_error,
    stop_group,
    tail_of,
)

BINARY_NAME = "transfer_engine_bench"
ENV_BINARY = "TSUKIMI_MOONCAKE_BENCH"  # optional override: path to a transfer_engine_bench binary


class MooncakeBenchError(RuntimeError):
    """The bench ran but failed (target never came up, initiator exited non-zero, no result line)."""


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
                [str(binary), "--mode=target", f"--local_server_name=127.0.0.1:{free_port()}", *common],
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
                f"--local_server_name=127.0.0.1:{free_port()}",
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
        prog="python -m harness.mooncake.engine",
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
