"""The transfer engine's TCP wire protocol: a mutual HMAC handshake, then pipelined binary requests.

Handshake (both sides prove they hold the cluster secret; nothing is served before it succeeds):
  server -> client  MAGIC, version, nonce_s (32 B)
  client -> server  nonce_c (32 B), HMAC(secret, "C" + nonce_s + nonce_c)
  server -> client  status (1 B), HMAC(secret, "S" + nonce_c + nonce_s)
Request:  op (1 B), buffer id (4 B), seq (8 B), offset (8 B), length (8 B); WRITE and NOTIFY carry `length`
          payload bytes after it. WRITE_TAGGED is a WRITE carrying its owner tag (8 B) between header and payload,
          for buffers with a write guard (see write_guard.py); an untagged WRITE into such a buffer is refused.
Response: seq (8 B), status (1 B), message length (4 B), message; a successful READ is followed by the bytes.
A connection serves requests in order, so a client may send many before reading the responses.
RDMA control (only to engines that offer rdma; buffer id and offset 0): RDMA_CONNECT carries the client's
msgpack QpInfo, RDMA_REGIONS nothing; on success the response's message is the msgpack reply (see
rdma_host.Hello; not truncated). The target keeps a QP made by RDMA_CONNECT until the connection closes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct

MAGIC = b"TSKT"
VERSION = 1
NONCE_BYTES = 32

OP_READ, OP_WRITE, OP_NOTIFY, OP_RDMA_CONNECT, OP_RDMA_REGIONS, OP_WRITE_TAGGED = 1, 2, 3, 4, 5, 6
OP_NAMES = {OP_READ: "READ", OP_WRITE: "WRITE", OP_NOTIFY: "NOTIFY", OP_RDMA_CONNECT: "RDMA_CONNECT",
            OP_RDMA_REGIONS: "RDMA_REGIONS", OP_WRITE_TAGGED: "WRITE_TAGGED"}

STATUS_OK, STATUS_BOUNDS, STATUS_ACCESS, STATUS_NO_BUFFER, STATUS_BAD_REQUEST, STATUS_REFUSED = range(6)

REQUEST = struct.Struct(">BIQQQ")
# The owner tag of a WRITE_TAGGED, after its header.
TAG = struct.Struct(">Q")
RESPONSE = struct.Struct(">QBI")
MAX_MESSAGE_BYTES = 4096
# Largest NOTIFY payload a server accepts.
MAX_NOTIFY_BYTES = 1 << 20
# Largest RDMA_CONNECT / RDMA_REGIONS payload a server accepts.
MAX_RDMA_REQUEST_BYTES = 4096


class AuthError(ConnectionError):
    """The peer does not hold the cluster secret (or is not a tsukimi engine)."""


def _mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"".join(parts), hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes; ConnectionError when the peer closes first."""
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fills `view` from the socket; ConnectionError when the peer closes first.

    On a blocking socket MSG_WAITALL makes the kernel fill the whole view in one call (one wake-up per slice
    instead of one per arriving chunk); the loop only covers signals and timeouts.
    """
    received, n = 0, len(view)
    while received < n:
        got = sock.recv_into(view[received:], n - received, socket.MSG_WAITALL)
        if got == 0:
            raise ConnectionError(f"peer closed after {received} of {n} bytes")
        received += got


# The handshake's steps without I/O (the same for blocking sockets and asyncio streams); `magic` names the
# protocol that follows (the transfer engine's, or the cache pool's session lane).

def _hello(magic: bytes) -> tuple[bytes, bytes]:
    """(server nonce, the server's first message)."""
    nonce_s = os.urandom(NONCE_BYTES)
    return nonce_s, magic + bytes([VERSION]) + nonce_s


def _answer_hello(secret: bytes, hello: bytes, magic: bytes) -> tuple[bytes, bytes, bytes]:
    """(client nonce, server nonce, the client's proof message) for a server's hello."""
    if hello[:len(magic)] != magic or hello[len(magic)] != VERSION:
        raise AuthError(f"peer does not speak {magic.decode(errors='replace')} version {VERSION}")
    nonce_s = hello[len(magic) + 1:]
    nonce_c = os.urandom(NONCE_BYTES)
    return nonce_c, nonce_s, nonce_c + _mac(secret, b"C", nonce_s, nonce_c)


def _check_client(secret: bytes, nonce_s: bytes, reply: bytes) -> tuple[bool, bytes]:
    """(whether the client proved the secret, the server's last message)."""
    nonce_c, proof = reply[:NONCE_BYTES], reply[NONCE_BYTES:]
    if not hmac.compare_digest(proof, _mac(secret, b"C", nonce_s, nonce_c)):
        return False, bytes([STATUS_REFUSED]) + bytes(32)
    return True, bytes([STATUS_OK]) + _mac(secret, b"S", nonce_c, nonce_s)


def _check_server(secret: bytes, nonce_c: bytes, nonce_s: bytes, answer: bytes) -> None:
    if answer[0] != STATUS_OK:
        raise AuthError("server refused our credentials (cluster secret mismatch)")
    if not hmac.compare_digest(answer[1:], _mac(secret, b"S", nonce_c, nonce_s)):
        raise AuthError("server failed authentication")


def server_handshake(sock: socket.socket, secret: bytes, magic: bytes = MAGIC) -> None:
    """Authenticates a client; raises AuthError (after telling it) when it fails."""
    nonce_s, hello = _hello(magic)
    sock.sendall(hello)
    is_ok, last = _check_client(secret, nonce_s, recv_exact(sock, NONCE_BYTES + 32))
    sock.sendall(last)
    if not is_ok:
        raise AuthError("client failed authentication")


def client_handshake(sock: socket.socket, secret: bytes, magic: bytes = MAGIC) -> None:
    """Authenticates to a server and checks that the server holds the secret too."""
    nonce_c, nonce_s, proof = _answer_hello(secret, recv_exact(sock, len(magic) + 1 + NONCE_BYTES), magic)
    sock.sendall(proof)
    _check_server(secret, nonce_c, nonce_s, recv_exact(sock, 33))


async def server_handshake_async(reader, writer, secret: bytes, magic: bytes) -> None:
    """`server_handshake` over asyncio streams; IncompleteReadError when the client leaves."""
    nonce_s, hello = _hello(magic)
    writer.write(hello)
    is_ok, last = _check_client(secret, nonce_s, await reader.readexactly(NONCE_BYTES + 32))
    writer.write(last)
    await writer.drain()
    if not is_ok:
        raise AuthError("client failed authentication")


async def client_handshake_async(reader, writer, secret: bytes, magic: bytes) -> None:
    """`client_handshake` over asyncio streams; IncompleteReadError when the server leaves."""
    hello = await reader.readexactly(len(magic) + 1 + NONCE_BYTES)
    nonce_c, nonce_s, proof = _answer_hello(secret, hello, magic)
    writer.write(proof)
    _check_server(secret, nonce_c, nonce_s, await reader.readexactly(33))


def send_all(sock: socket.socket, header: bytes, payload: memoryview) -> None:
    """Sends header and payload with as few system calls as the kernel allows (scatter-gather)."""
    sent = sock.sendmsg([header, payload])
    total = len(header) + len(payload)
    if sent < total:
        if sent < len(header):
            sock.sendall(header[sent:])
            sent = len(header)
        sock.sendall(payload[sent - len(header):])


def set_kernel_timeout(sock: socket.socket, timeout_s: float | None) -> None:
    """Blocking socket whose sends and receives fail with EAGAIN after `timeout_s` (None: never).

    NOTE: Python's own socket timeouts put the descriptor in non-blocking mode, where MSG_WAITALL cannot wait;
    kernel timeouts keep it blocking.
    """
    sock.settimeout(None)
    seconds = int(timeout_s or 0)
    micros = int(((timeout_s or 0) - seconds) * 1e6)
    value = struct.pack("ll", seconds, micros)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def is_timeout(exc: BaseException) -> bool:
    """True for a socket timeout, Python's or the kernel's (EAGAIN on a blocking socket)."""
    return isinstance(exc, (socket.timeout, BlockingIOError)) or getattr(exc, "errno", None) in (11,)


def tune(sock: socket.socket) -> None:
    """No Nagle delay. NOTE: buffer sizes are left to the kernel: setting SO_SNDBUF/SO_RCVBUF turns off its
    autotuning (which grows further than the settable maximum) and measured no faster here."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
