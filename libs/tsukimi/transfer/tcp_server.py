"""The target side of the TCP transport: serves READ, WRITE and NOTIFY straight from/into registered memory,
and the control requests of the RDMA transport.

One thread per connection (socket calls release the GIL, so connections run in parallel); payloads are
received directly into the registered buffer, never staged.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from tsukimi.transfer import wire
from tsukimi.transfer.batch import check_range
from tsukimi.transfer.write_guard import WriteGuard

log = logging.getLogger(__name__)

# Resolves a buffer id to (byte view, is_writable, its write guard or None), or None.
Lookup = Callable[[int], tuple[memoryview, bool, WriteGuard | None] | None]
# Accepts a peer's RDMA queue pair (its msgpack QpInfo): (reply, function closing our QP).
RdmaAccept = Callable[[bytes], tuple[bytes, Callable[[], None]]]


class TcpServer:
    """Accepts authenticated peers and applies their requests to this process's registered buffers."""

    def __init__(self, lookup: Lookup, secret: bytes, on_notify: Callable[[bytes], None], host: str, port: int,
                 handshake_timeout_s: float = 5.0, idle_timeout_s: float | None = None,
                 rdma_accept: RdmaAccept | None = None, rdma_regions: Callable[[], bytes] | None = None):
        """`rdma_accept` and `rdma_regions` serve RDMA_CONNECT and RDMA_REGIONS (see wire.py) when this engine
        offers rdma; without them those requests are refused."""
        self._lookup = lookup
        self._rdma_accept = rdma_accept
        self._rdma_regions = rdma_regions
        # Per connection: closers of the RDMA queue pairs it made, called when it ends.
        self._rdma_closers: dict[socket.socket, list[Callable[[], None]]] = {}
        self._secret = secret
        self._on_notify = on_notify
        self._handshake_timeout_s = handshake_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._listener = socket.create_server((host, port), backlog=128, reuse_port=False)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.num_auth_failures = 0
        self._thread = threading.Thread(target=self._accept_loop, name="transfer-accept", daemon=True)

    def start(self) -> "TcpServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
        self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            wire.tune(conn)
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="transfer-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self._handshake_timeout_s)
            try:
                wire.server_handshake(conn, self._secret)
            except wire.AuthError as exc:
                self.num_auth_failures += 1
                log.warning("refused a transfer peer: %s", exc)
                return
            wire.set_kernel_timeout(conn, self._idle_timeout_s)
            scratch = bytearray(1 << 20)
            while True:
                header = bytearray(wire.REQUEST.size)
                try:
                    wire.recv_into_exact(conn, memoryview(header))
                except ConnectionError:
                    return
                op, buffer_id, seq, offset, length = wire.REQUEST.unpack(header)
                self._handle(conn, scratch, op, buffer_id, seq, offset, length)
        except (OSError, ConnectionError) as exc:
            if not self._closed:
                log.debug("transfer connection ended: %s", exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
                closers = self._rdma_closers.pop(conn, ())
            for closer in closers:
                try:
                    closer()
                except Exception as exc:
                    log.warning("closing an rdma queue pair failed: %s", exc)
            conn.close()

    def _handle(self, conn, scratch: bytearray, op: int, buffer_id: int, seq: int, offset: int, length: int) -> None:
        if op == wire.OP_NOTIFY:
            if length > wire.MAX_NOTIFY_BYTES:
                self._drain(conn, scratch, length)
                return self._reply(conn, seq, wire.STATUS_BAD_REQUEST, "notification too large")
            payload = wire.recv_exact(conn, length)
            try:
                self._on_notify(payload)
            except Exception as exc:  # NOTE: the application's handler must not kill the connection.
                log.warning("notification handler failed: %s", exc)
            return self._reply(conn, seq, wire.STATUS_OK)
        tag = wire.TAG.unpack(wire.recv_exact(conn, wire.TAG.size))[0] if op == wire.OP_WRITE_TAGGED else 0
        if op == wire.OP_WRITE_TAGGED:
            op = wire.OP_WRITE
        status, message, view = self._check(op, buffer_id, offset, length, tag)
        if op == wire.OP_WRITE:
            if status != wire.STATUS_OK:
                # NOTE: the payload follows the header; read it away so the connection stays in sync.
                self._drain(conn, scratch, length)
                return self._reply(conn, seq, status, message)
            wire.recv_into_exact(conn, view[offset:offset + length])
            return self._reply(conn, seq, wire.STATUS_OK)
        if op == wire.OP_READ:
            if status == wire.STATUS_OK:
                wire.send_all(conn, wire.RESPONSE.pack(seq, status, 0), view[offset:offset + length])
            else:
                self._reply(conn, seq, status, message)
            return
        if op in (wire.OP_RDMA_CONNECT, wire.OP_RDMA_REGIONS):
            return self._handle_rdma(conn, scratch, op, seq, length)
        self._reply(conn, seq, wire.STATUS_BAD_REQUEST, f"unknown op {op}")
        raise ConnectionError("protocol error")

    def _handle_rdma(self, conn, scratch: bytearray, op: int, seq: int, length: int) -> None:
        if length > wire.MAX_RDMA_REQUEST_BYTES:
            self._drain(conn, scratch, length)
            return self._reply(conn, seq, wire.STATUS_BAD_REQUEST, "rdma request too large")
        payload = wire.recv_exact(conn, length) if length else b""
        if self._rdma_accept is None or self._rdma_regions is None:
            return self._reply(conn, seq, wire.STATUS_REFUSED, "this engine does not offer rdma")
        try:
            if op == wire.OP_RDMA_CONNECT:
                reply, closer = self._rdma_accept(payload)
                with self._lock:
                    self._rdma_closers.setdefault(conn, []).append(closer)
                # NOTE: data then moves by RDMA and this connection stays quiet; an idle timeout must not end it
                # (that would close the QP under the peer's transfers).
                wire.set_kernel_timeout(conn, None)
            else:
                reply = self._rdma_regions()
        except Exception as exc:
            return self._reply(conn, seq, wire.STATUS_REFUSED, f"rdma: {exc}")
        conn.sendall(wire.RESPONSE.pack(seq, wire.STATUS_OK, len(reply)) + reply)

    def _check(self, op: int, buffer_id: int, offset: int, length: int, tag: int):
        entry = self._lookup(buffer_id)
        if entry is None:
            return wire.STATUS_NO_BUFFER, f"buffer {buffer_id} is not registered", None
        view, is_writable, guard = entry
        if op == wire.OP_WRITE and not is_writable:
            return wire.STATUS_ACCESS, f"buffer {buffer_id} is read-only", None
        problem = check_range(offset, length, len(view))
        if problem:
            return wire.STATUS_BOUNDS, problem, None
        if op == wire.OP_WRITE and guard is not None:
            # NOTE: checked before the payload is received into the buffer (write_guard.py: the remaining race).
            problem = guard.refusal(offset, length, tag)
            if problem:
                return wire.STATUS_REFUSED, problem, None
        return wire.STATUS_OK, "", view

    @staticmethod
    def _drain(conn, scratch: bytearray, length: int) -> None:
        view = memoryview(scratch)
        while length > 0:
            n = min(length, len(scratch))
            wire.recv_into_exact(conn, view[:n])
            length -= n

    @staticmethod
    def _reply(conn, seq: int, status: int, message: str = "") -> None:
        data = message.encode()[: wire.MAX_MESSAGE_BYTES]
        conn.sendall(wire.RESPONSE.pack(seq, status, len(data)) + data)
