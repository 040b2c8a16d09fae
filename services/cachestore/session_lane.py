"""The session lane: `CacheStore.Session`'s messages over a plain TCP stream, beside the gRPC API.

The same `SessionRequest` / `SessionReply` protobufs (libs/tsukimi/proto/cachestore.proto), framed as
`tsukimi.kvpool.session_lane` says, after the transfer engine's mutual HMAC handshake with the cluster secret.
Every message is answered by the servicer's own `answer`, as on the gRPC stream; a refusal is sent as a
`SessionReply.error` and ends the connection (as an abort ends the gRPC stream). When the instance's pool goes
(it stops being the master, or starts a new pool), its open sessions end with UNAVAILABLE, on both ways: what its
clients were told (their leases) no longer holds.

Why it exists: a message on grpc.aio costs two or more hand-offs between grpc's poller thread and the event loop
on each side; a plain stream costs one wake-up. On the project's 2-core VMs an empty round trip measured
0.26-0.40 ms on the gRPC stream against 0.18-0.24 ms here (`python -m tsukimi.bench.session_rtt`), and single
256 KiB gets of the pool went from 1.0-1.7k to 3.0k a second. The gRPC API stays the complete one; clients find
the lane through `SessionLane` and use it when they hold the secret.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
from google.protobuf.message import DecodeError

from tsukimi.cachestore.servicer import CacheStoreServicer
from tsukimi.kvpool import session_lane as lane
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.transfer import wire

log = logging.getLogger(__name__)

# How long a session whose pool went waits for its client to close after being told why.
_GONE_WAIT_S = 2.0


class Refusal(Exception):
    """What `context.abort` raises on the lane: the call's gRPC status and details."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    """The part of a gRPC servicer context the servicer's handlers use."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Refusal(code, details)


class SessionLane:
    """Serves session messages to authenticated peers on `host:port` (0: any free port)."""

    def __init__(self, servicer: CacheStoreServicer, secret: bytes, host: str, port: int,
                 handshake_timeout_s: float = 5.0):
        self._servicer = servicer
        self._secret = secret
        self._host, self._port = host, port
        self._handshake_timeout_s = handshake_timeout_s
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.num_auth_failures = 0

    async def start(self) -> "SessionLane":
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await asyncio.wait_for(wire.server_handshake_async(reader, writer, self._secret, lane.MAGIC),
                                       self._handshake_timeout_s)
            except (wire.AuthError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.num_auth_failures += 1
                log.warning("refused a session lane peer: %s", exc or type(exc).__name__)
                return
            self._servicer.track_session()
            await self._answer_all(reader, writer)
        except asyncio.CancelledError:
            if not self._servicer.is_ending(asyncio.current_task()):
                raise
            await self._end_gone(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # NOTE: the peer left; nothing of its is pending here.
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer_all(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = _Context()
        while True:
            try:
                request = pb.SessionRequest.FromString(await lane.read_frame(reader))
            except (ValueError, DecodeError) as exc:
                return self._refuse(writer, 0, Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                                       f"malformed session message: {exc}"))
            try:
                reply, after = await self._servicer.answer(request, context)
                writer.write(lane.frame(reply))
                if after is not None:
                    await after()
            except Refusal as refusal:
                return self._refuse(writer, request.id, refusal)
            except Exception as exc:  # NOTE: as grpc would: the stream ends with UNKNOWN, the lane goes on.
                log.exception("session message %d failed", request.id)
                return self._refuse(writer, request.id, Refusal(grpc.StatusCode.UNKNOWN, repr(exc)))
            if writer.transport.get_write_buffer_size() > lane.DRAIN_BYTES:
                await writer.drain()

    async def _end_gone(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Ends a session whose pool went (CacheStoreServicer.use): says why, then waits for the client to close
        (a close with its unread messages here would reset the connection, and the reason with it)."""
        self._refuse(writer, 0, Refusal(grpc.StatusCode.UNAVAILABLE, self._servicer.gone_details()))
        try:
            writer.write_eof()
            async with asyncio.timeout(_GONE_WAIT_S):
                while await reader.read(1 << 16):
                    pass
        except (OSError, TimeoutError):
            pass

    @staticmethod
    def _refuse(writer: asyncio.StreamWriter, request_id: int, refusal: Refusal) -> None:
        writer.write(lane.frame(pb.SessionReply(id=request_id, error=pb.SessionError(code=refusal.code.value[0],
                                                                                details=refusal.details))))
