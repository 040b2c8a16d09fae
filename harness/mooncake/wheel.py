"""Where the pieces of Mooncake's PyPI wheel are, and the child processes the harnesses run them in.

The wheel `mooncake-transfer-engine-non-cuda` ships its C++ binaries (`transfer_engine_bench`,
`mooncake_master`) inside its `mooncake` package; they need Debian's libibverbs1, librdmacm1 and libnuma1 to load:
`scripts/install-mooncake-bench.sh` installs all of it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

WHEEL = "mooncake-transfer-engine-non-cuda"
INSTALL_HINT = f"run scripts/install-mooncake-bench.sh (apt: libibverbs1 librdmacm1 libnuma1; pip: {WHEEL})"
_LOADER_RE = re.compile(r"error while loading shared libraries: (\S+?):")


class MooncakeUnavailable(RuntimeError):
    """The Mooncake wheel, its binary or the shared libraries it loads are missing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def loader_error(output: str) -> str | None:
    """The missing shared library named in a dynamic-loader failure, or None."""
    m = _LOADER_RE.search(output)
    return m.group(1) if m else None


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


def free_port() -> int:
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
