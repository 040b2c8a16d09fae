"""Connecting to NATS (used only by each service's `service.py`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats
from nats.aio.client import Client

from tsukimi.common.messages import Heartbeat, encode

log = logging.getLogger(__name__)


async def connect(url: str, name: str, timeout_s: float = 30.0) -> Client:
    """A NATS connection that reconnects forever once established; retries the first connect for `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await nats.connect(
                url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2
            )
        except (OSError, nats.errors.NoServersError, asyncio.TimeoutError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"cannot reach NATS at {url}: {exc}") from exc
            log.info("waiting for NATS at %s", url)
            await asyncio.sleep(0.5)


async def heartbeat_forever(
    nc: Client, subject: str, make_beat: Callable[[bool], Heartbeat], interval_s: float, stop: asyncio.Event
) -> None:
    """Publishes `make_beat(False)` every `interval_s` until `stop`, then a last `make_beat(True)` (leaving)."""
    while not stop.is_set():
        try:
            await nc.publish(subject, encode(make_beat(False)))
        except Exception as exc:  # NOTE: a heartbeat must never kill the service; the next one retries.
            log.warning("heartbeat failed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass
    if nc.is_connected:
        await nc.publish(subject, encode(make_beat(True)))
        await nc.flush(timeout=2)
