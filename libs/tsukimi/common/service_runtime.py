"""One runtime for all five services: start-up, heartbeats, the probe, cancellations, background work, and one
ordered shutdown (used only by each service's `service.py`, the code that touches NATS).

A service's `run(stop)` reads: `connect`, subscribe its own subjects, `beat`, loop until `stop`, `shutdown`.
`shutdown` stops in one order: stop taking work (the service's own step) -> the goodbye heartbeat
(`is_leaving`) -> the loops ended by `stop` -> background work, awaited with a bound -> resources closed in the
order they were opened -> NATS drained.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from nats.aio.client import Client

from tsukimi.common import subjects
from tsukimi.common.bus import connect, heartbeat_forever
from tsukimi.common.expiring import ExpiringSet
from tsukimi.common.messages import CancelRequest, Heartbeat, decode

log = logging.getLogger(__name__)

# Seconds a cancellation is remembered: longer than a task can wait in a queue (a cancel may come first).
CANCEL_MEMORY_S = 600.0
# Seconds background work (stores of KV blocks, joins) gets to finish on shutdown.
BACKGROUND_WAIT_S = 5.0

Closer = Callable[[], Awaitable[None] | None]


class ServiceRuntime:
    """What a service runs beside its own loop: its NATS connection, heartbeats, the requests cancelled
    recently, loops that end with `stop`, background tasks, and the resources to close at the end."""

    def __init__(self, instance_id: str):
        self.instance_id = instance_id
        self.nc: Client | None = None
        # Requests cancelled recently (filled by `follow_cancels`).
        self.cancelled = ExpiringSet(CANCEL_MEMORY_S)
        self._beats: asyncio.Task | None = None
        self._loops: list[asyncio.Task] = []
        # Background tasks (see `spawn`); a service may add its own tasks here too.
        self.background: set[asyncio.Task] = set()
        self._closers: list[Closer] = []

    async def connect(self, url: str) -> Client:
        """Connects to NATS as this instance (see `bus.connect`)."""
        self.nc = await connect(url, self.instance_id)
        return self.nc

    def beat(self, kind: str, make_beat: Callable[[bool], Heartbeat], interval_s: float,
             stop: asyncio.Event) -> None:
        """Publishes `make_beat(False)` every `interval_s` until `stop`, then the goodbye `make_beat(True)`."""
        self._beats = asyncio.create_task(heartbeat_forever(
            self.nc, subjects.heartbeat(kind, self.instance_id), make_beat, interval_s, stop))

    async def follow_cancels(self, on_cancel: Callable[[CancelRequest], Awaitable[None] | None] | None = None
                             ) -> None:
        """Remembers every cancellation in `cancelled` (and hands it to `on_cancel`)."""

        async def handle(msg) -> None:
            try:
                cancel = decode(msg.data, CancelRequest)
            except msgspec.ValidationError:
                return
            self.cancelled.add(cancel.request_id)
            if on_cancel is not None and inspect.isawaitable(result := on_cancel(cancel)):
                await result

        await self.nc.subscribe(subjects.CANCEL, cb=handle)

    def loop(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Runs a loop that ends by itself once `stop` is set (awaited on shutdown, after the goodbye beat)."""
        task = asyncio.create_task(coro)
        self._loops.append(task)
        return task

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Runs background work awaited, for at most `BACKGROUND_WAIT_S`, on shutdown."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def on_close(self, close: Closer) -> None:
        """Closes a resource on shutdown; resources close in the order they were registered."""
        self._closers.append(close)

    async def shutdown(self, stop_work: Callable[[], Awaitable[None]] | None = None, *,
                       background_wait_s: float = BACKGROUND_WAIT_S) -> None:
        """Stops the service in the one order (see the module's docstring); every step runs even if one
        before it failed, and NATS is drained last."""
        steps: list[Callable[[], Awaitable[None]]] = []
        if stop_work is not None:
            steps.append(stop_work)
        steps += [self._say_goodbye, self._end_loops, lambda: self._settle(background_wait_s), self._close]
        for step in steps:
            try:
                await step()
            except Exception:  # noqa: BLE001 (shutting down anyway: the next steps still run)
                log.warning("shutdown step %s failed", getattr(step, "__name__", step), exc_info=True)
        await self._drain()

    async def _say_goodbye(self) -> None:
        if self._beats is not None:
            await self._beats

    async def _end_loops(self) -> None:
        for task in self._loops:
            await task

    async def _settle(self, timeout_s: float) -> None:
        if self.background:
            await asyncio.wait(set(self.background), timeout=timeout_s)

    async def _close(self) -> None:
        for close in self._closers:
            result = close()
            if inspect.isawaitable(result):
                await result

    async def _drain(self) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except Exception:  # noqa: BLE001 (shutting down anyway)
            log.warning("could not drain the NATS connection", exc_info=True)


def require_secret(settings, command: str) -> None:
    """Exits with a readable message when the cluster secret is set but unusable."""
    try:
        settings.secret_bytes()
    except ValueError as exc:
        raise SystemExit(f"tsukimi {command}: {exc}") from None


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Calls `main(stop)` in a fresh event loop; `stop` is set on the first SIGINT or SIGTERM."""

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(_run())
    log.info("stopped")


def run_with_probe(
    service: str,
    host: str,
    port: int,
    run: Callable[[asyncio.Event], Awaitable[None]],
    health: Callable[[], tuple[bool, dict]],
) -> None:
    """Runs `run(stop)` until a signal, with the probe server (/metrics, /health) on host:port meanwhile."""
    from tsukimi.common.probe import ProbeServer

    async def _main(stop: asyncio.Event) -> None:
        probe = ProbeServer(service, health, host, port).start()
        log.info("probe on http://%s:%d", host, probe.port)
        try:
            await run(stop)
        finally:
            probe.stop()

    run_until_signal(_main)
