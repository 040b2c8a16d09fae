"""The initiator side of the TCP transport: a pool of authenticated connections to one peer, each pipelining a
window of slices (requests go out back to back, responses are read after)."""

from __future__ import annotations

import logging
import queue
import socket
import threading

from tsukimi.transfer import wire
from tsukimi.transfer.batch import Op, Slice, Status

log = logging.getLogger(__name__)

_STOP = object()


class TcpPeer:
    """Moves slices to and from one peer over `num_connections` connections made on demand."""

    name = "tcp"

    def __init__(self, address: str, secret: bytes, num_connections: int = 4, window: int = 16,
                 timeout_s: float = 10.0, connect_timeout_s: float = 3.0):
        host, port = address.rsplit(":", 1)
        self.address = (host, int(port))
        self._secret = secret
        self._window = window
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._seq = 0
        self._workers = [threading.Thread(target=self._work, name=f"transfer-tcp-{i}", daemon=True)
                         for i in range(num_connections)]
        for worker in self._workers:
            worker.start()

    def submit(self, slices: list[Slice]) -> None:
        for piece in slices:
            self._queue.put(piece)

    def notify(self, payload: bytes) -> None:
        """Delivers a small message to the peer's engine (on a connection of its own)."""
        sock = self._connect()
        try:
            sock.sendall(wire.REQUEST.pack(wire.OP_NOTIFY, 0, 0, 0, len(payload)) + payload)
            _, status, n = wire.RESPONSE.unpack(wire.recv_exact(sock, wire.RESPONSE.size))
            message = wire.recv_exact(sock, n).decode(errors="replace")
            if status != wire.STATUS_OK:
                raise ConnectionError(f"notification refused: {message}")
        finally:
            sock.close()

    def close(self) -> None:
        self._closed = True
        for _ in self._workers:
            self._queue.put(_STOP)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self._connect_timeout_s)
        try:
            wire.tune(sock)
            wire.client_handshake(sock, self._secret)
            wire.set_kernel_timeout(sock, self._timeout_s)
        except BaseException:
            sock.close()
            raise
        return sock

    def _work(self) -> None:
        sock: socket.socket | None = None
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            group = [first]
            while len(group) < self._window:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                group.append(nxt)
            try:
                if sock is None:
                    sock = self._connect()
                self._exchange(sock, group)
            except OSError as exc:
                self._close(sock)
                sock = None
                if not wire.is_timeout(exc):
                    self._retry_or_fail(group, exc)
                    continue
                for piece in group:
                    if not piece.is_finished:
                        piece.done(f"peer {self.address[0]}:{self.address[1]} did not answer within "
                                   f"{self._timeout_s}s", Status.TIMEOUT)
        self._close(sock)

    def _retry_or_fail(self, group: list[Slice], exc: BaseException) -> None:
        for piece in group:
            if piece.is_finished:
                continue
            piece.attempts += 1
            if piece.attempts < 2 and not self._closed:
                self._queue.put(piece)  # NOTE: retried once, on whichever connection takes it next.
            else:
                piece.done(f"transfer to {self.address[0]}:{self.address[1]} failed: {exc}")

    @staticmethod
    def _close(sock: socket.socket | None) -> None:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _exchange(self, sock: socket.socket, group: list[Slice]) -> None:
        seqs = []
        # NOTE: READ headers are small; they leave together in one system call, after any WRITE payloads.
        read_headers = []
        for piece in group:
            self._seq += 1
            seqs.append(self._seq)
            if piece.op == Op.WRITE:
                op = wire.OP_WRITE_TAGGED if piece.tag else wire.OP_WRITE
                header = wire.REQUEST.pack(op, piece.buffer_id, self._seq, piece.target_offset, piece.length)
                if piece.tag:
                    header += wire.TAG.pack(piece.tag)
                if read_headers:
                    sock.sendall(b"".join(read_headers))
                    read_headers.clear()
                wire.send_all(sock, header, piece.local)
            else:
                read_headers.append(wire.REQUEST.pack(wire.OP_READ, piece.buffer_id, self._seq, piece.target_offset,
                                                      piece.length))
        if read_headers:
            sock.sendall(b"".join(read_headers))
        for seq, piece in zip(seqs, group):
            got_seq, status, n = wire.RESPONSE.unpack(wire.recv_exact(sock, wire.RESPONSE.size))
            message = wire.recv_exact(sock, n).decode(errors="replace") if n else ""
            if got_seq != seq:
                raise ConnectionError(f"response for {got_seq} while expecting {seq}")
            if status != wire.STATUS_OK:
                piece.done(f"refused by peer: {message}")
                continue
            if piece.op == Op.READ:
                wire.recv_into_exact(sock, piece.local)
            piece.done()
