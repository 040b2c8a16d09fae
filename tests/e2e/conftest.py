"""Runs `tsukimi up` as a subprocess and talks to it over HTTP, like a user."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

from tsukimi.common.natsserver import NatsServer, free_port


@dataclass
class Deployment:
    """A running `tsukimi up`."""

    process: subprocess.Popen
    base_url: str
    nats_url: str
    model: str
    log_path: str

    def children(self) -> list[int]:
        """PIDs of the launcher's direct children."""
        return _children(self.process.pid)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_up(tmp_path_factory, *args: str, nats_url: str | None = None, timeout_s: float = 240,
             env: dict[str, str] | None = None) -> Deployment:
    """Starts `tsukimi up` with `args` (and `env` over the test's environment) on a free port and waits until
    /health is ready."""
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("up") / "up.log")
    cmd = [sys.executable, "-m", "tsukimi", "up", "--port", str(port), *args]
    if nats_url:
        cmd += ["--nats-url", nats_url]
    env = dict(os.environ, **(env or {}), TSUKIMI_HEARTBEAT_INTERVAL_S="0.3", TSUKIMI_INSTANCE_TTL_S="2",
               TSUKIMI_DATABASE_URL=f"sqlite:///{tmp_path_factory.mktemp('db')}/journal.db")
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"tsukimi up exited with {process.returncode}:\n{open(log_path).read()[-5000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_up(Deployment(process, base, nats_url or "", "", log_path))
            raise RuntimeError(f"tsukimi up not ready in {timeout_s}s:\n{open(log_path).read()[-5000:]}")
        time.sleep(0.3)
    with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
        model = json.load(r)["data"][0]["id"]
    return Deployment(process, base, nats_url or "", model, log_path)


def stop_up(deployment: Deployment, sig: int = signal.SIGINT, timeout_s: float = 30) -> tuple[int, list[int]]:
    """Signals the launcher; returns its exit code and the children still alive afterwards."""
    children = deployment.children()
    deployment.process.send_signal(sig)
    try:
        code = deployment.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        deployment.process.kill()
        code = deployment.process.wait()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    return code, [p for p in children if _alive(p)]


def greedy_ids(model, prompt_ids: list[int], max_tokens: int, **generate_args) -> list[int]:
    """The new token ids of transformers' own greedy `generate` on `prompt_ids` (the correctness anchor)."""
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                             **generate_args)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def demo_up(tmp_path_factory):
    """`tsukimi up` with the demo model on its own NATS server (so tests can watch the bus)."""
    with NatsServer() as nats_server:
        deployment = start_up(tmp_path_factory, "--model", "demo", "--prefill", "1", "--decode", "1",
                              nats_url=nats_server.url)
        yield deployment
        code, orphans = stop_up(deployment)
        assert code == 0 and orphans == [], deployment.log()[-3000:]
