"""A direct TCP path for KV bytes between two processes (the full transfer engine replaces it later).

Frame on the wire: 4-byte big-endian header length, msgpack `TransferHeader`, then `num_bytes` of payload.
The receiver answers every frame with a length-prefixed msgpack `TransferAck` once the bytes are in its
memory, so a sender that got `ok` knows the data has landed. KV bytes never cross NATS.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable

import msgspec

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024


class TransferError(RuntimeError):
    """A transfer did not complete: refused by the receiver, connection lost, or timed out."""


class TransferHeader(msgspec.Struct):
    """Describes one payload."""

    # Key the receiver files the bytes under (the request id).
    key: str
    # Application metadata (e.g. the msgpack KV layout).
    meta: bytes
    # Payload size.
    num_bytes: int


class TransferAck(msgspec.Struct):
    """Receiver's verdict on one payload."""

    # True when the payload is stored.
    ok: bool
    # Why not.
    error: str = ""


# Called with (key, meta, num_bytes) before the payload is read: returns a writable buffer of num_bytes to
# receive into, or raises `TransferError` to refuse (e.g. no memory).
Allocate = Callable[[str, bytes, int], bytearray]
# Called once the payload is in the buffer.
Deliver = Callable[[str, bytes, bytearray], Awaitable[None] | None]


async def _write_frame(writer: asyncio.StreamWriter, obj: msgspec.Struct) -> None:
    data = msgspec.msgpack.encode(obj)
    writer.write(_LEN.pack(len(data)) + data)
    await writer.drain()


async def _read_frame(reader: asyncio.StreamReader, kind: type):
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_HEADER_BYTES:
        raise TransferError(f"frame header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    return msgspec.msgpack.decode(await reader.readexactly(size), type=kind)


class TcpReceiver:
    """Accepts payloads from senders into buffers the application allocates."""

    def __init__(
        self,
        allocate: Allocate,
        deliver: Deliver,
        abort: Callable[[str], None] = lambda key: None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self._allocate = allocate
        self._deliver = deliver
        # Called with the key of a payload that was allocated but did not fully arrive.
        self._abort = abort
        self._host = host
        self._port = port
        self._server: asyncio.base_events.Server | None = None
        self.num_bytes_received = 0

    async def start(self) -> str:
        """Listens; returns the "host:port" to advertise."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        port = self._server.sockets[0].getsockname()[1]
        return f"{self._host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending_key = None
        try:
            while True:
                try:
                    header = await _read_frame(reader, TransferHeader)
                except asyncio.IncompleteReadError:
                    return
                try:
                    buffer = self._allocate(header.key, header.meta, header.num_bytes)
                except TransferError as exc:
                    # NOTE: the payload is already on its way; closing the connection is cheaper than draining it.
                    await _write_frame(writer, TransferAck(ok=False, error=str(exc)))
                    return
                pending_key = header.key
                view = memoryview(buffer)
                received = 0
                while received < header.num_bytes:
                    chunk = await reader.read(min(1 << 20, header.num_bytes - received))
                    if not chunk:
                        raise TransferError(f"sender closed after {received} of {header.num_bytes} bytes")
                    view[received : received + len(chunk)] = chunk
                    received += len(chunk)
                self.num_bytes_received += received
                result = self._deliver(header.key, header.meta, buffer)
                if asyncio.iscoroutine(result):
                    await result
                pending_key = None
                await _write_frame(writer, TransferAck(ok=True))
        except (TransferError, ConnectionError, msgspec.DecodeError) as exc:
            log.warning("KV receive failed: %s", exc)
        finally:
            if pending_key is not None:
                self._abort(pending_key)
            writer.close()


class TcpSender:
    """Sends payloads to receivers, one pooled connection per peer."""

    def __init__(self, timeout_s: float = 30.0):
        self._timeout_s = timeout_s
        self._connections: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def send(self, address: str, key: str, meta: bytes, payload: memoryview | bytes) -> None:
        """Delivers `payload` to `address`; returns once the receiver has it, raises `TransferError` otherwise."""
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:
            try:
                await asyncio.wait_for(self._send_locked(address, key, meta, payload), self._timeout_s)
            except asyncio.TimeoutError as exc:
                self._drop(address)
                raise TransferError(f"transfer to {address} timed out after {self._timeout_s}s") from exc
            except (ConnectionError, OSError, asyncio.IncompleteReadError, msgspec.DecodeError) as exc:
                self._drop(address)
                raise TransferError(f"transfer to {address} failed: {exc!r}") from exc

    async def _send_locked(self, address: str, key: str, meta: bytes, payload) -> None:
        if address not in self._connections:
            host, port = address.rsplit(":", 1)
            self._connections[address] = await asyncio.open_connection(host, int(port))
        reader, writer = self._connections[address]
        payload = memoryview(payload).cast("B")
        await _write_frame(writer, TransferHeader(key=key, meta=meta, num_bytes=payload.nbytes))
        writer.write(payload)
        await writer.drain()
        ack = await _read_frame(reader, TransferAck)
        if not ack.ok:
            self._drop(address)
            raise TransferError(f"{address} refused {key}: {ack.error}")

    def _drop(self, address: str) -> None:
        connection = self._connections.pop(address, None)
        if connection is not None:
            connection[1].close()

    async def close(self) -> None:
        for address in list(self._connections):
            self._drop(address)
