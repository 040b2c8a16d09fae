"""Mooncake Store's `mooncake_master`: its binary, its command line, when its log and ports say it serves."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

from harness.mooncake.store_spec import MooncakeStoreBenchError, MooncakeStoreUnavailable
from harness.mooncake.wheel import INSTALL_HINT, find_wheel_binary, loader_error

MASTER_BINARY = "mooncake_master"
ENV_MASTER = "TSUKIMI_MOONCAKE_MASTER"  # optional override: path to a mooncake_master binary

# "I1125 00:12:54.392601 13918 master.cpp:1522] Master service started on port 50551, max_threads=..."
_MASTER_RPC_RE = re.compile(r"Master service started on port (\d+)")

# "I1125 00:12:54.393599 13918 http_metadata_server.cpp:126] HTTP metadata server started on 127.0.0.1:8181"
_MASTER_HTTP_RE = re.compile(r"HTTP metadata server started on (\S+):(\d+)")

# glog fatal/check failures and the master's own startup errors.
_MASTER_FATAL_RE = re.compile(r"^(F\d{4} .*|.*Check failed.*|.*[Ff]ailed to (start|bind|listen).*)$", re.M)


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


def find_master_binary() -> Path:
    """Path of `mooncake_master`: $TSUKIMI_MOONCAKE_MASTER, else the one in the mooncake wheel."""
    path = find_wheel_binary(MASTER_BINARY, ENV_MASTER, MooncakeStoreUnavailable)
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError as exc:
            raise MooncakeStoreUnavailable(f"{path} is not executable: {exc}") from exc
    return path


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_master(proc: subprocess.Popen, log: Path, http_metadata: bool, timeout_s: float) -> dict:
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
