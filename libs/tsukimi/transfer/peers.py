"""The segments a transfer engine talks to: their descriptors, their transports, and which one carries what.

`Peers` resolves a segment's descriptor in the metadata store (cached, re-read when its process died or its
buffers changed), picks the transport per peer buffer (shm on the same host, else rdma when both offer it,
else tcp, or the forced one), makes each transport on first use, and hands a batch's requests to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass

from tsukimi.transfer.batch import Batch, Op, TransferError, cut
from tsukimi.transfer.descriptor import BufferDescriptor, SegmentDescriptor, local_host_id
from tsukimi.transfer.memory import pid_alive
from tsukimi.transfer.metadata import METADATA_TIMEOUT_S, MetadataStore
from tsukimi.transfer.metrics import PEER_TRANSPORT, bytes_counter
from tsukimi.transfer.rdma_host import RdmaHost
from tsukimi.transfer.rdma_peer import RdmaPeer
from tsukimi.transfer.shm_peer import ShmPeer
from tsukimi.transfer.tcp_peer import TcpPeer

log = logging.getLogger(__name__)


@dataclass
class Peer:
    """One segment this engine talks to, and its transports (made on first use)."""

    descriptor: SegmentDescriptor
    tcp: TcpPeer | None = None
    shm: ShmPeer | None = None
    rdma: RdmaPeer | None = None
    logged: set | None = None
    # Transport chosen per buffer id: (transport, "") or ("", why none).
    choices: dict | None = None

    def close(self) -> None:
        """Closes its transports."""
        if self.tcp:
            self.tcp.close()
        if self.shm:
            self.shm.forget()
        if self.rdma:
            self.rdma.close()


class Peers:
    """The engine's peers by segment name (`peers[name]`, `peers.get(name)`), with the engine's transport
    settings."""

    def __init__(self, metadata: MetadataStore, secret: bytes, *, transports: tuple[str, ...],
                 force_transport: str | None, rdma: RdmaHost | None, rdma_problem: str,
                 executor: concurrent.futures.Executor, num_connections: int, window: int, slice_bytes: int,
                 shm_slice_bytes: int, inline_copy_bytes: int, timeout_s: float):
        self._metadata = metadata
        self._secret = secret
        self._transports = transports
        self._force_transport = force_transport
        self._rdma = rdma
        self._rdma_problem = rdma_problem
        self._executor = executor
        self._num_connections = num_connections
        self._window = window
        self._slice_bytes = slice_bytes
        # NOTE: a shm request is cut into copies of at most this size, so that one large request is shared by the
        # copy jobs too (a single 4 MiB pool get: 5.6-5.7 -> 6.1-6.4 GB/s with 1 MiB against 8 MiB here).
        self._shm_slice_bytes = shm_slice_bytes
        # A shm submission's share of at most this many bytes is copied by the submitting thread (see ShmPeer).
        self._inline_copy_bytes = inline_copy_bytes
        self._timeout_s = timeout_s
        self._peers: dict[str, Peer] = {}

    def __getitem__(self, name: str) -> Peer:
        return self._peers[name]

    def get(self, name: str) -> Peer | None:
        return self._peers.get(name)

    def close(self) -> None:
        """Closes every peer's transports."""
        for peer in self._peers.values():
            peer.close()

    async def open(self, name: str, refresh: bool = False) -> SegmentDescriptor:
        """The descriptor of segment `name` (cached; `refresh` re-reads it). Raises TransferError if unknown."""
        peer = self._peers.get(name)
        if peer is not None and not refresh:
            return peer.descriptor
        try:
            descriptor = await asyncio.wait_for(self._metadata.get(name), METADATA_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise TransferError(f"metadata store did not answer for segment {name!r}") from None
        if descriptor is None:
            raise TransferError(f"segment {name!r} is not published (unknown, or its process died)")
        if peer is not None and (peer.descriptor.tcp_address != descriptor.tcp_address
                                 or peer.descriptor.pid != descriptor.pid):
            self.drop(name)
            peer = None
        if peer is None:
            self._peers[name] = Peer(descriptor, logged=set(), choices={})
        else:
            if peer.descriptor.generation != descriptor.generation:
                peer.choices.clear()
            peer.descriptor = descriptor
        return descriptor

    async def refresh_dead(self, names: set[str], alive: dict[int, bool]) -> None:
        """Re-reads the descriptors of same-host peers whose process has died: a restarted peer published a new
        one under the same name (a dead one stays dead, and its requests fail). Records in `alive` what it learnt
        of each pid, so the batch does not ask again."""
        for name in names:
            peer = self._peers.get(name)
            if peer is None or peer.descriptor.host_id != local_host_id():
                continue
            pid = peer.descriptor.pid
            alive[pid] = pid_alive(pid)
            if alive[pid]:
                continue
            try:
                descriptor = await self.open(name, refresh=True)
            except TransferError:
                continue
            if descriptor.pid not in alive:
                alive[descriptor.pid] = pid_alive(descriptor.pid)

    def drop(self, name: str) -> None:
        """Forgets a peer and closes its transports (it is re-resolved on next use)."""
        peer = self._peers.pop(name, None)
        if peer is not None:
            peer.close()

    def tcp(self, peer: Peer) -> TcpPeer:
        """The peer's tcp transport, made on first use."""
        if peer.tcp is None:
            peer.tcp = TcpPeer(peer.descriptor.tcp_address, self._secret, self._num_connections, self._window,
                               self._timeout_s)
        return peer.tcp

    # ---- transport choice --------------------------------------------------------------------------------

    def choose(self, peer: Peer, buffer: BufferDescriptor) -> tuple[str, str]:
        """(transport, "") for a request to `buffer` of `peer`, or ("", why none can carry it); cached."""
        choice = peer.choices.get(buffer.buffer_id)
        if choice is None:
            choice = peer.choices[buffer.buffer_id] = self._choose_uncached(peer, buffer)
        return choice

    def _choose_uncached(self, peer: Peer, buffer: BufferDescriptor) -> tuple[str, str]:
        d = peer.descriptor
        same_host = d.host_id == local_host_id()
        if self._force_transport:
            options = [self._force_transport]
        else:
            options = [t for t in ("shm", "rdma", "tcp") if t in self._transports and t in d.transports]
        reasons = []
        for transport in options:
            if transport == "shm":
                if not same_host:
                    reasons.append("shm: peer is on another host")
                    continue
                if peer.shm is None:
                    peer.shm = ShmPeer(self._executor, inline_bytes=self._inline_copy_bytes)
                problem = peer.shm.can_reach(buffer)
                if problem:
                    reasons.append(f"shm: {problem}")
                    continue
            elif transport == "rdma":
                if self._rdma is None:
                    reasons.append(f"rdma: {self._rdma_problem}")
                    continue
                if "rdma" not in d.transports:
                    reasons.append("rdma: peer does not offer it")
                    continue
                if same_host and not self._force_transport:
                    reasons.append("rdma: peer is on this host")
                    continue
                if buffer.guard_shm_name:
                    reasons.append("rdma: the buffer's writes are guarded (one-sided RDMA writes go unchecked)")
                    continue
            elif transport == "tcp" and "tcp" not in d.transports:
                reasons.append("tcp: peer does not offer it")
                continue
            self._log_choice(peer, buffer, transport, reasons)
            return transport, ""
        return "", "; ".join(reasons) or "no common transport"

    def _log_choice(self, peer: Peer, buffer: BufferDescriptor, transport: str, reasons: list[str]) -> None:
        key = (buffer.buffer_id, transport)
        if key in peer.logged:
            return
        peer.logged.add(key)
        PEER_TRANSPORT.labels(peer.descriptor.name, transport).set(1)
        why = f" ({'; '.join(reasons)})" if reasons else ""
        log.info("transfers to %s buffer %d use %s%s", peer.descriptor.name, buffer.buffer_id, transport, why)

    # ---- dispatch ----------------------------------------------------------------------------------------

    def dispatch_shm(self, batch: Batch, peer: Peer, buffer_id: int, indices: list[int]) -> None:
        """Hands `indices` of `batch` to the shm transport as plain copies: no per-request slice objects or
        completion calls (a job reports all it moved at once)."""
        size = self._shm_slice_bytes
        requests = batch.requests
        copies = []
        counts = []
        num_bytes = {Op.READ: 0, Op.WRITE: 0}
        for index in indices:
            request = requests[index]
            op, length, local_offset, target_offset = (request.op, request.length, request.local_offset,
                                                       request.target_offset)
            local = request.local.array
            if length <= size:
                copies.append((index, op, local, local_offset, target_offset, length))
                counts.append((index, 1))
            else:
                n = 0
                for start in range(0, length, size):
                    copies.append((index, op, local, local_offset + start, target_offset + start,
                                   min(size, length - start)))
                    n += 1
                counts.append((index, n))
            num_bytes[op] += length
        batch.start_many(counts, "shm")
        for op, n in num_bytes.items():
            if n:
                bytes_counter("shm", op).inc(n)
        peer.shm.submit_copies(peer.descriptor.buffer(buffer_id), batch, copies,
                               num_bytes[Op.READ] + num_bytes[Op.WRITE])

    def dispatch(self, batch: Batch, peer: Peer, transport: str, buffer_id: int, indices: list[int]) -> None:
        """Hands `indices` of `batch` to the tcp or rdma transport as slices."""
        slices = []
        size = self._shm_slice_bytes if transport == "shm" else self._slice_bytes
        if transport == "rdma":
            size = min(size, self._rdma.max_message_size)
        num_bytes = {Op.READ: 0, Op.WRITE: 0}
        for index in indices:
            request = batch.requests[index]
            local = request.local.view[request.local_offset:request.local_offset + request.length]
            pieces = cut(batch, index, local, size)
            batch.start(index, len(pieces), transport)
            num_bytes[request.op] += request.length
            slices.extend(pieces)
        for op, n in num_bytes.items():
            if n:
                bytes_counter(transport, op).inc(n)
        if transport == "rdma":
            if peer.rdma is None:
                peer.rdma = RdmaPeer(self._rdma, peer.descriptor.tcp_address, self._secret, self._timeout_s)
            peer.rdma.submit(peer.descriptor.buffer(buffer_id), slices)
        else:
            self.tcp(peer).submit(slices)
