"""`tsukimi up`: an embedded NATS server and one process per service instance, stopped together on a signal."""

from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

_PR_SET_PDEATHSIG = 1


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="a known model (smollm2, the default: pulled into the model cache on first use), 'demo' "
                             "(the built-in seeded model), a local Hugging Face checkpoint directory, or a .gguf file "
                             "(or a directory holding one: converted once)")
    parser.add_argument("--host", default="127.0.0.1", help="address the API binds to")
    parser.add_argument("--port", type=int, default=8000, help="port of the OpenAI-compatible API")
    parser.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill worker processes")
    parser.add_argument("--decode", type=int, default=1, metavar="N", help="decode worker processes")
    parser.add_argument("--cachestore", type=int, default=1, metavar="N",
                        help="cachestore processes forming the KV cache pool (one is elected master)")
    parser.add_argument("--cache-ssd-dir", default=None, metavar="DIR",
                        help="give every cachestore an SSD tier in DIR/<name> (kept across restarts)")
    parser.add_argument("--nats-url", default=None, help="use this NATS server instead of an embedded one")
    parser.add_argument("--database-url", default=None,
                        help="SQLAlchemy URL of the conductor's journal (default: SQLite under ~/.cache/tsukimi)")
    parser.add_argument("--colocated", action="store_true",
                        help="the vLLM-style baseline: worker processes that each do both prefill and decode of their "
                             "requests on one device (continuous batching), no cache pool; same API")
    parser.add_argument("--colocated-instances", type=int, default=2, metavar="N",
                        help="with --colocated: colocated worker processes (default 2: as many devices as the "
                             "default 1 prefill + 1 decode)")
    parser.add_argument("--colocated-prefix-cache", action="store_true",
                        help="with --colocated: each instance reuses prefixes from its own in-process LRU cache "
                             "(size TSUKIMI_LOCAL_PREFIX_CACHE_BYTES)")
    parser.add_argument("--chunked-prefill", type=int, default=None, metavar="K",
                        help="with --colocated: prefill prompts in chunks of K tokens interleaved with decode steps "
                             "(default TSUKIMI_CHUNKED_PREFILL_TOKENS, 0 = whole prompts)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the API to be ready")


# A child that dies after start-up is restarted, unless it died this many times within RESTART_WINDOW_S.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


@dataclass
class Child:
    """A service process started by `up`."""

    name: str
    # `tsukimi` subcommand it runs.
    service: str
    process: subprocess.Popen
    # Its environment (kept for restarts).
    env: dict[str, str] = field(default_factory=dict)
    # Monotonic times of its restarts.
    restarts: list[float] = field(default_factory=list)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the launcher dies, so no orphan outlives `up`."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _say(message: str) -> None:
    print(f"tsukimi up: {message}", file=sys.stderr, flush=True)


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


class Launcher:
    """Starts, watches and stops the processes of one local deployment."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.children: list[Child] = []
        self.nats = None
        self._stop_signal: int | None = None
        # What the children load ("demo" or a checkpoint directory) and the name clients send as `model`.
        self.model_dir = args.model
        self.served_model_name = args.model

    def _env(self, nats_url: str) -> dict[str, str]:
        env = dict(os.environ)
        cache = os.path.join(os.path.expanduser("~"), ".cache", "tsukimi")
        os.makedirs(cache, exist_ok=True)
        env.update({
            "TSUKIMI_NATS_URL": nats_url,
            "TSUKIMI_MODEL": self.model_dir,
            "TSUKIMI_SERVED_MODEL_NAME": self.served_model_name,
            "TSUKIMI_HOST": self.args.host,
            "TSUKIMI_GATEWAY_PORT": str(self.args.port),
            "TSUKIMI_METRICS_PORT": "0",
            "TSUKIMI_KV_PORT": "0",
            "TSUKIMI_CACHESTORE_GRPC_PORT": "0",
            # NOTE: one secret per deployment; transfer engines refuse peers without it.
            "TSUKIMI_CLUSTER_SECRET": env.get("TSUKIMI_CLUSTER_SECRET") or secrets.token_hex(32),
            "TSUKIMI_DATABASE_URL": self.args.database_url
            or env.get("TSUKIMI_DATABASE_URL", f"sqlite:///{os.path.join(cache, 'tsukimi.db')}"),
        })
        if self.args.log_level:
            env["TSUKIMI_LOG_LEVEL"] = self.args.log_level
        return env

    def _start(self, service: str, env: dict[str, str]) -> subprocess.Popen:
        # NOTE: the colocated worker is not a `tsukimi` subcommand of its own; it runs as a module.
        command = ["-m", "tsukimi.colocated"] if service == "colocated" else ["-m", "tsukimi", service]
        return subprocess.Popen([sys.executable, *command], env=env, preexec_fn=_die_with_parent)

    def _spawn(self, name: str, service: str, env: dict[str, str]) -> None:
        self.children.append(Child(name, service, self._start(service, env), env))

    def _restart(self, child: Child) -> bool:
        """Restarts a child that died while serving; False when it keeps dying."""
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(child.restarts) > MAX_RESTARTS:
            return False
        _say(f"{child.name} exited with {child.process.returncode}; restarting it")
        child.process = self._start(child.service, child.env)
        return True

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        args = self.args
        if args.prefill < 1 or args.decode < 1 or args.cachestore < 1:
            _say("--prefill, --decode and --cachestore need at least 1")
            return 2
        colocated = getattr(args, "colocated", False)
        if colocated and args.colocated_instances < 1:
            _say("--colocated-instances needs at least 1")
            return 2
        if not colocated and (getattr(args, "colocated_prefix_cache", False)
                              or getattr(args, "chunked_prefill", None) is not None):
            _say("--colocated-prefix-cache and --chunked-prefill apply to --colocated only")
            return 2
        if colocated and args.chunked_prefill is not None and args.chunked_prefill < 0:
            _say("--chunked-prefill needs 0 or more tokens")
            return 2
        if not self._resolve_model():
            return 2
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            return self._run()
        finally:
            self.stop()

    def _resolve_model(self) -> bool:
        """Pulls and converts the model before any service starts; False (said why) when it cannot be served."""
        from tsukimi.model.cli import default_cache_dir
        from tsukimi.model.resolve import ModelUnavailable, resolve_model, served_name

        try:
            self.model_dir = resolve_model(self.args.model, default_cache_dir(), can_pull=True)
        except ModelUnavailable as exc:
            _say(str(exc))
            return False
        except KeyboardInterrupt:
            _say("interrupted while preparing the model; nothing was started")
            return False
        self.served_model_name = os.environ.get("TSUKIMI_SERVED_MODEL_NAME") or served_name(self.args.model)
        return True

    def _run(self) -> int:
        args = self.args
        nats_url = args.nats_url
        if nats_url is None:
            from tsukimi.common.natsserver import NatsServer

            self.nats = NatsServer().start(preexec_fn=_die_with_parent)
            nats_url = self.nats.url
            _say(f"embedded NATS (JetStream) at {nats_url}")
        env = self._env(nats_url)
        if getattr(args, "colocated", False):
            return self._run_colocated(env)
        for i in range(args.cachestore):
            name = "cachestore" if args.cachestore == 1 else f"cachestore-{i}"
            child_env = dict(env)
            if args.cache_ssd_dir:
                child_env["TSUKIMI_CACHE_SSD_DIR"] = os.path.join(os.path.abspath(args.cache_ssd_dir), name)
            self._spawn(name, "cachestore", child_env)
        self._spawn("conductor", "conductor", env)
        for i in range(args.prefill):
            self._spawn(f"prefill-{i}", "prefill", env)
        for i in range(args.decode):
            self._spawn(f"decode-{i}", "decode", env)
        self._spawn("gateway", "gateway", env)
        return self._serve(f"{args.prefill} prefill, {args.decode} decode")

    def _run_colocated(self, env: dict[str, str]) -> int:
        """The vLLM-style baseline: a conductor placing each request on one colocated worker (prefill and decode
        in one process, one device), no cache pool."""
        args = self.args
        env = dict(env, TSUKIMI_PLACEMENT_POLICY="colocated",
                   TSUKIMI_IS_CACHE_ENABLED="true" if args.colocated_prefix_cache else "false")
        if args.chunked_prefill is not None:
            env["TSUKIMI_CHUNKED_PREFILL_TOKENS"] = str(args.chunked_prefill)
        self._spawn("conductor", "conductor", env)
        for i in range(args.colocated_instances):
            self._spawn(f"colocated-{i}", "colocated", env)
        self._spawn("gateway", "gateway", env)
        chunk = int(env.get("TSUKIMI_CHUNKED_PREFILL_TOKENS") or 0)
        return self._serve(f"{args.colocated_instances} colocated, chunked prefill "
                           f"{f'{chunk} tokens' if chunk else 'off'}, "
                           f"prefix cache {'local' if args.colocated_prefix_cache else 'off'}")

    def _serve(self, layout: str) -> int:
        """Waits until the API is ready, then watches (restarts) the children until a signal."""
        args = self.args
        api = f"http://{args.host}:{args.port}"
        deadline = time.monotonic() + args.ready_timeout
        while not _is_ready(f"{api}/health"):
            if self._stop_signal is not None:
                return 0
            if (dead := self._dead_child()) is not None:
                _say(f"{dead.name} exited with {dead.process.returncode} during start-up")
                return 1
            if time.monotonic() > deadline:
                _say(f"API not ready within {args.ready_timeout:.0f}s")
                return 1
            time.sleep(0.2)
        model = ("demo (built-in seeded Llama)" if self.model_dir == "demo"
                 else f"{self.served_model_name} ({self.model_dir})")
        _say(f"ready. API at {api}/v1 serving model {model} ({layout}). Ctrl-C stops everything.")
        while self._stop_signal is None:
            if (dead := self._dead_child()) is not None and not self._restart(dead):
                _say(f"{dead.name} died {MAX_RESTARTS + 1} times within {RESTART_WINDOW_S:.0f}s; stopping everything")
                return 1
            time.sleep(0.2)
        _say(f"got {signal.Signals(self._stop_signal).name}; stopping")
        return 0

    def _dead_child(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every child (gateway first), wait, SIGKILL what is left, then stop NATS."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in reversed(self.children):
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"{child.name} did not stop in {timeout_s:.0f}s; killing it")
                child.process.kill()
                child.process.wait()
        if self.nats is not None:
            self.nats.stop()
        self.children.clear()


def up(args: argparse.Namespace) -> int:
    """Entry point of `tsukimi up`."""
    return Launcher(args).run()
