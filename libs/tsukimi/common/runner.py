"""Runs a service's async main until SIGINT/SIGTERM, then lets it shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


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
