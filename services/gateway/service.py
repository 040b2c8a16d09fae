"""The gateway process: its NATS side (`GatewayBus`, the only code here touching NATS) and the HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque

import msgspec
import nats.errors
import uvicorn
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from tsukimi.common import subjects
from tsukimi.common.bus import connect
from tsukimi.common.service_runtime import ServiceRuntime, run_until_signal
from tsukimi.common.messages import (
    CancelRequest,
    ErrorInfo,
    GenerateRequest,
    Heartbeat,
    SubmitReply,
    TokenEvent,
    decode,
    encode,
)
from tsukimi.common.registry import InstanceRegistry
from tsukimi.common.settings import Settings
from tsukimi.gateway import errors
from tsukimi.gateway.app import create_app
from tsukimi.gateway.stream import EventOrderer
from tsukimi.text.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# Pools that must have a live instance for the gateway to report ready.
REQUIRED_POOLS = ("prefill", "decode")
# Lost instances remembered for `GatewayBus.is_lost`.
MAX_LOST_REMEMBERED = 4096
# Seconds uvicorn lets open connections (long streams) finish after a stop before cancelling them.
GRACEFUL_SHUTDOWN_S = 5.0


class NatsTokenStream:
    """One request's TokenEvents from its stream subject, reordered by index (a `stream.TokenStream`)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._sub: Subscription | None = None
        self._orderer = EventOrderer()
        self._ready: deque[TokenEvent] = deque()
        self._arrived = asyncio.Event()
        self._closed = False

    async def subscribe(self, nc: Client) -> NatsTokenStream:
        self._sub = await nc.subscribe(subjects.stream(self.request_id), cb=self._on_message)
        return self

    async def _on_message(self, msg) -> None:
        try:
            event = decode(msg.data, TokenEvent)
        except msgspec.ValidationError as exc:
            log.warning("dropping a malformed token event: %s", exc)
            return
        if event.request_id != self.request_id:
            log.warning("dropping a token event of request %s", event.request_id)
            return
        ready = self._orderer.push(event)
        if ready:
            self._ready.extend(ready)
            self._arrived.set()

    async def next_event(self, timeout_s: float) -> TokenEvent:
        """The next event in index order; `TimeoutError` when none is deliverable within `timeout_s`."""
        if not self._ready:
            try:
                async with asyncio.timeout(timeout_s):
                    while not self._ready:
                        self._arrived.clear()
                        await self._arrived.wait()
            except TimeoutError:
                raise TimeoutError(f"no token event within {timeout_s}s") from None
        return self._ready.popleft()

    async def close(self) -> None:
        if self._closed or self._sub is None:
            return
        self._closed = True
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()


class GatewayBus:
    """The gateway's side of NATS: submit requests, receive their tokens, cancel them, track worker health.

    Implements `tsukimi.gateway.stream.Bus`. Call `start()` once (heartbeat tracking), `close()` at the end.
    """

    def __init__(self, nc: Client, *, submit_timeout_s: float, instance_ttl_s: float):
        self.nc = nc
        self._submit_timeout_s = submit_timeout_s
        self._registry = InstanceRegistry(ttl_s=instance_ttl_s)
        self._heartbeats: Subscription | None = None
        # Instances heard from that then left or went silent (bounded: oldest forgotten first).
        self._lost: dict[str, float] = {}

    @classmethod
    async def connect(cls, settings: Settings) -> GatewayBus:
        """Connects to `settings.nats_url` and starts tracking heartbeats."""
        nc = await connect(settings.nats_url, name=settings.instance_name("gateway"))
        bus = cls(nc, submit_timeout_s=settings.submit_timeout_s, instance_ttl_s=settings.instance_ttl_s)
        return await bus.start()

    async def start(self) -> GatewayBus:
        self._heartbeats = await self.nc.subscribe(subjects.HEARTBEAT_ALL, cb=self._on_heartbeat)
        return self

    async def stop_tracking(self) -> None:
        """Stops tracking heartbeats (the connection stays: its owner closes it)."""
        if self._heartbeats is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._heartbeats.unsubscribe()
            self._heartbeats = None

    async def close(self, *, drain: bool = True) -> None:
        """Stops tracking heartbeats and closes the connection (a bus made by `connect`)."""
        await self.stop_tracking()
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                if drain:
                    await self.nc.drain()
                else:
                    await self.nc.close()

    async def _on_heartbeat(self, msg) -> None:
        try:
            beat = decode(msg.data, Heartbeat)
        except msgspec.ValidationError as exc:
            log.warning("dropping a malformed heartbeat on %s: %s", msg.subject, exc)
            return
        if beat.is_leaving:
            self._registry.remove(beat.instance_id)
            self._mark_lost(beat.instance_id)
            log.info("%s %s left", beat.kind, beat.instance_id)
        elif self._registry.observe(beat, time.monotonic()):
            self._lost.pop(beat.instance_id, None)
            log.info("%s %s joined", beat.kind, beat.instance_id)

    def _mark_lost(self, instance_id: str) -> None:
        self._lost[instance_id] = time.monotonic()
        while len(self._lost) > MAX_LOST_REMEMBERED:
            del self._lost[next(iter(self._lost))]

    def is_lost(self, instance_id: str) -> bool:
        """True when `instance_id` was heard from and has since left or stopped heartbeating."""
        for dead in self._registry.expire(time.monotonic()):
            self._mark_lost(dead)
            log.warning("instance %s stopped heartbeating", dead)
        return instance_id in self._lost

    async def submit(self, request: GenerateRequest) -> SubmitReply:
        """The conductor's decision; an unreachable or silent conductor comes back as a refused 503 reply."""
        try:
            msg = await self.nc.request(subjects.SUBMIT, encode(request), timeout=self._submit_timeout_s)
        except nats.errors.NoRespondersError:
            return SubmitReply(is_accepted=False, error=errors.no_conductor("no conductor is subscribed"))
        except (TimeoutError, nats.errors.TimeoutError):
            detail = f"no reply within {self._submit_timeout_s:g}s"
            return SubmitReply(is_accepted=False, error=errors.no_conductor(detail))
        except nats.errors.Error as exc:
            return SubmitReply(is_accepted=False, error=errors.bus_unavailable(type(exc).__name__))
        try:
            return decode(msg.data, SubmitReply)
        except msgspec.ValidationError as exc:
            log.error("malformed reply from the conductor: %s", exc)
            info = ErrorInfo(
                message="the conductor sent a malformed reply", code="bad_conductor_reply", http_status=502
            )
            return SubmitReply(is_accepted=False, error=info)

    async def open_stream(self, request_id: str) -> NatsTokenStream:
        """Subscribes to the request's stream subject (before `submit`, so no event is missed)."""
        # NOTE: SUB then PUB on one connection reach the server in order, so the subscription is in place
        # before the conductor even sees the request.
        return await NatsTokenStream(request_id).subscribe(self.nc)

    async def cancel(self, request_id: str, reason: str) -> None:
        await self.nc.publish(subjects.CANCEL, encode(CancelRequest(request_id=request_id, reason=reason)))

    def is_ready(self) -> tuple[bool, dict]:
        """Ready when connected and at least one prefill and one decode instance heartbeat within the TTL."""
        now = time.monotonic()
        for dead in self._registry.expire(now):
            self._mark_lost(dead)
        alive = {pool: len(self._registry.alive(pool, now)) for pool in REQUIRED_POOLS}
        missing = [pool for pool, count in alive.items() if count == 0]
        is_connected = self.nc.is_connected
        details = {
            "nats": "connected" if is_connected else "disconnected",
            "instances": alive,
            "missing": missing,
        }
        return is_connected and not missing, details


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service's stop event decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class GatewayService:
    """The running gateway: NATS connection plus the HTTP server on `settings.host:settings.gateway_port`."""

    def __init__(self, settings: Settings, tokenizer: TextTokenizer | None = None):
        self.settings = settings
        self._tokenizer = tokenizer
        self.bus: GatewayBus | None = None
        # Start-up and shutdown (the gateway sends no heartbeats: nobody places work on it).
        self.runtime: ServiceRuntime | None = None
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> str:
        """Connects, binds, and serves; returns the base URL once the server accepts connections."""
        tokenizer = self._tokenizer or TextTokenizer.load(self.settings.model)
        sock = _bind(self.settings.host, self.settings.gateway_port)
        self.port = sock.getsockname()[1]
        try:
            self.runtime = ServiceRuntime(self.settings.instance_name("gateway"))
            nc = await self.runtime.connect(self.settings.nats_url)
            self.bus = await GatewayBus(nc, submit_timeout_s=self.settings.submit_timeout_s,
                                        instance_ttl_s=self.settings.instance_ttl_s).start()
            self.runtime.on_close(self.bus.stop_tracking)
            app = create_app(self.settings, self.bus, tokenizer)
            config = uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
            self._server = _Server(config)
            self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="uvicorn")
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError("the HTTP server stopped during start-up")
                await asyncio.sleep(0.01)
        except BaseException:
            sock.close()
            await self.stop()
            raise
        log.info("gateway serving %s on %s", self.settings.model_name(), self.url)
        return self.url

    async def stop(self) -> None:
        """Stops accepting, lets open requests finish (briefly), then disconnects from NATS."""
        if self.runtime is not None:
            await self.runtime.shutdown(self._stop_http)
        else:
            await self._stop_http()
        self.runtime = self.bus = None

    async def _stop_http(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        self._server = self._task = None


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Serves until `stop` is set."""
    service = GatewayService(settings)
    await service.start()
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await service.stop()


def main(settings: Settings) -> None:
    """`tsukimi gateway`: serves until SIGINT or SIGTERM."""
    run_until_signal(lambda stop: run(settings, stop))
