"""The pool master's batch calls over one long-lived stream (`CacheStore.Session`), with the stub's signatures.

A unary gRPC call costs a new HTTP/2 stream, a call object and metadata on both sides; a message on an open
stream costs a fraction of that (measured on the project's 2-core VMs: ~0.13 ms round trip against ~0.45 ms).
`PoolSession` stands in for the stub where `PoolClient` (or anyone) makes many batch calls: BatchPutStart,
BatchPutEnd, BatchPutRevoke, BatchGet and Reserve become session messages, answered in order and matched by id; every
other method goes to the stub unchanged.

With the cluster `secret`, the messages go over the instance's session lane instead (the same messages on a
plain TCP stream, one wake-up per message instead of grpc's thread hand-offs; see
services/cachestore/session_lane.py), when the instance offers one (`SessionLane`) and it can be reached;
otherwise, with a warning, over the gRPC stream. A lane that refuses the secret fails the operation with
UNAUTHENTICATED (the transfer engine would refuse that secret too).

Failures look like the calls' own: an operation the master refuses ends the stream with that call's status
(every operation waiting on it gets that `grpc.aio.AioRpcError`), a lost connection or master gives UNAVAILABLE,
and an operation with no answer within its timeout gives DEADLINE_EXCEEDED (its late answer is dropped). The
next operation after a failure opens a new stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket

import grpc

from tsukimi.kvpool import session_lane as lane
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer import wire

log = logging.getLogger(__name__)


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _expire(answer: asyncio.Future, timeout: float) -> None:
    if not answer.done():
        answer.set_exception(_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no answer from the pool master within {timeout}s"))


_STATUS = {code.value[0]: code for code in grpc.StatusCode}
# How long opening the lane (asking for it, connecting, the handshake) may take when the operation gives no timeout.
_LANE_OPEN_S = 5.0


class _LaneCall:
    """A session lane connection, with the gRPC stream call's write / read / cancel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    async def write(self, request: pb.SessionRequest) -> None:
        if self._writer.is_closing():
            raise _error(grpc.StatusCode.UNAVAILABLE, "the session lane is closed")
        self._writer.write(lane.frame(request))
        if self._writer.transport.get_write_buffer_size() > lane.DRAIN_BYTES:
            await self._writer.drain()

    async def read(self):
        """The next reply, grpc.aio.EOF when the lane ends; a refusal raises its status."""
        try:
            reply = pb.SessionReply.FromString(await lane.read_frame(self._reader))
        except asyncio.IncompleteReadError:
            return grpc.aio.EOF
        if reply.WhichOneof("result") == "error":
            raise _error(_STATUS.get(reply.error.code, grpc.StatusCode.UNKNOWN), reply.error.details)
        return reply

    def cancel(self) -> None:
        self._writer.close()


class PoolSession:
    """Batch calls as messages of one `CacheStore.Session` stream (or session lane, given the cluster `secret`);
    safe to use from many tasks at once."""

    def __init__(self, stub: pb_grpc.CacheStoreStub, secret: bytes | None = None):
        self.stub = stub
        self._secret = secret
        # Whether the messages go over the lane ("lane"), the gRPC stream ("grpc"), or nothing is open ("").
        self.transport = ""
        # Goes up by one whenever a stream opens or ends (odd while one is open): what a master said on one stream
        # (its leases, say) is known to still hold only while `epoch` is the same (a new stream may reach another
        # master, or a restarted one).
        self.epoch = 0
        self._ids = itertools.count(1)
        self._call = None
        self._reader: asyncio.Task | None = None
        # Request id -> future of its reply, for the operations sent and not answered yet.
        self._waiting: dict[int, asyncio.Future] = {}
        self._write_lock = asyncio.Lock()
        self._closed = False

    # ---- the stub's batch calls ----------------------------------------------------------------------------

    async def BatchPutStart(self, request: pb.BatchPutStartRequest, timeout: float | None = None):
        return (await self._send(pb.SessionRequest(put_start=request), timeout)).put_start

    async def BatchPutEnd(self, request: pb.KeysRequest, timeout: float | None = None):
        return (await self._send(pb.SessionRequest(put_end=request), timeout)).empty

    async def BatchPutRevoke(self, request: pb.KeysRequest, timeout: float | None = None):
        return (await self._send(pb.SessionRequest(put_revoke=request), timeout)).empty

    async def BatchGet(self, request: pb.KeysRequest, timeout: float | None = None):
        return (await self._send(pb.SessionRequest(get=request), timeout)).get

    async def Reserve(self, request: pb.ReserveRequest, timeout: float | None = None):
        return (await self._send(pb.SessionRequest(reserve=request), timeout)).reserve

    def __getattr__(self, name: str):
        # NOTE: only for attributes not defined here: the stub's other calls, unchanged.
        return getattr(self.stub, name)

    @property
    def num_waiting(self) -> int:
        """Operations sent and not answered yet."""
        return len(self._waiting)

    async def close(self) -> None:
        """Ends the stream; operations still waiting fail with CANCELLED."""
        self._closed = True
        call, reader = self._call, self._reader
        self._call = self._reader = None
        self.transport = ""
        if call is not None:
            self.epoch += 1
            call.cancel()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self._fail_waiting(_error(grpc.StatusCode.CANCELLED, "pool session closed"))

    # ---- the stream --------------------------------------------------------------------------------------

    async def _send(self, request: pb.SessionRequest, timeout: float | None) -> pb.SessionReply:
        if self._closed:
            raise _error(grpc.StatusCode.CANCELLED, "pool session closed")
        request.id = next(self._ids)
        loop = asyncio.get_running_loop()
        # NOTE: awaited directly (no shield, no wait_for task): the reader resolves it, a timer fails it, and a
        # cancelled caller cancels it, after which its late answer is dropped.
        answer = loop.create_future()
        self._waiting[request.id] = answer
        timer = loop.call_later(timeout, _expire, answer, timeout) if timeout is not None else None
        try:
            async with self._write_lock:
                if answer.done():
                    # NOTE: failed with the stream it was meant for while waiting to write; sending it on a new one
                    # would have the master act on an operation whose caller has been told it failed.
                    return answer.result()
                call = await self._open(timeout)
                if answer.done():
                    return answer.result()  # NOTE: timed out while the stream was being opened: not sent.
                try:
                    await call.write(request)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, ConnectionError) as exc:
                    # NOTE: the stream ended under us; the reader fails every waiting operation with its status.
                    log.debug("pool session write failed: %s", exc)
            return await answer
        finally:
            if timer is not None:
                timer.cancel()
            self._waiting.pop(request.id, None)

    async def _open(self, timeout: float | None):
        if self._call is None:
            call = await self._open_lane(timeout or _LANE_OPEN_S) if self._secret is not None else None
            self.transport = "grpc" if call is None else "lane"
            self._call = call or self.stub.Session()
            self.epoch += 1
            self._reader = asyncio.ensure_future(self._read(self._call))
        return self._call

    async def _open_lane(self, timeout: float) -> _LaneCall | None:
        """A connection to the instance's session lane; None to use the gRPC stream (no lane offered, or it
        cannot be reached). Raises UNAUTHENTICATED when the lane refuses the secret."""
        try:
            address = (await self.stub.SessionLane(pb.Empty(), timeout=timeout)).address
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            address = ""  # NOTE: an instance older than the lane.
        if not address:
            log.info("the pool master offers no session lane; using the gRPC stream")
            return None
        host, port = address.rsplit(":", 1)
        writer = None
        try:
            # NOTE: connecting and the handshake share one time limit.
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await wire.client_handshake_async(reader, writer, self._secret, lane.MAGIC)
        except wire.AuthError as exc:
            writer.close()
            raise _error(grpc.StatusCode.UNAUTHENTICATED, f"the session lane at {address}: {exc}") from None
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            if writer is not None:
                writer.close()
            log.warning("the session lane at %s cannot be used (%r); using the gRPC stream", address, exc)
            return None
        except BaseException:  # NOTE: a cancelled caller leaves no half-open connection behind.
            if writer is not None:
                writer.close()
            raise
        return _LaneCall(reader, writer)

    async def _read(self, call) -> None:
        error = _error(grpc.StatusCode.UNAVAILABLE, "the pool master ended the session")
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                answer = self._waiting.get(reply.id)
                if answer is not None and not answer.done():
                    answer.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = _error(grpc.StatusCode.CANCELLED, "pool session closed")
        except Exception as exc:  # noqa: BLE001 (a broken stream of any kind fails its waiters, never hangs them)
            error = _error(grpc.StatusCode.UNAVAILABLE, f"pool session broke: {exc!r}")
        finally:
            call.cancel()  # NOTE: a lane's connection is closed with it; a gRPC call that has ended ignores it.
            if self._call is call:
                self._call = self._reader = None
                self.transport = ""
                self.epoch += 1
            self._fail_waiting(error)

    def _fail_waiting(self, error: grpc.aio.AioRpcError) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(error)
