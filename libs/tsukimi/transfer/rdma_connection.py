"""A reliable-connected queue pair to one peer: connect, post one-sided RDMA WRITE/READ, poll completions.

`RcConnection` is made on an `RdmaDevice` (rdma.py) and completes into the device's shared CQ; it uses the
device's verbs objects directly (the two were one module). Peers exchange `QpInfo` over the engine's TCP
control connection. Nothing here is thread-safe (see rdma.py).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from tsukimi.transfer.rdma import MemoryRegion, RdmaDevice, RdmaError, RemoteRegion, gid_value

# RC transport settings, the values of rdma-core's ibv_rc_pingpong.
_MIN_RNR_TIMER = 12
_TIMEOUT = 14
_RETRY_CNT = 7
_RNR_RETRY = 7
_HOP_LIMIT = 64


@dataclass(frozen=True)
class QpInfo:
    """What a peer needs to connect its QP to ours; plain ints and a str, so msgspec/JSON encode it as is."""

    # Port LID (InfiniBand); 0 on RoCE.
    lid: int
    qp_num: int
    # Initial packet sequence number of our send queue (24 bits).
    psn: int
    # Port GID at `gid_index`, "xxxx:xxxx:xxxx:xxxx:xxxx:xxxx:xxxx:xxxx"; required on RoCE.
    gid: str
    port: int
    gid_index: int
    # Active path MTU as an ibv_mtu value (1 = 256 bytes ... 5 = 4096 bytes).
    mtu: int


def check_bounds(
    offset: int, length: int, region_length: int, remote_offset: int, remote_length: int, max_message: int
) -> None:
    """Raises ValueError unless [offset, offset+length) lies in the local region,
    [remote_offset, remote_offset+length) in the remote one, and 0 < length <= max_message."""
    if length <= 0:
        # NOTE: an SGE of length 0 means 2 GiB to some HCAs, so an empty transfer is refused, not posted.
        raise ValueError(f"length must be positive, got {length}")
    if length > max_message:
        raise ValueError(f"length {length} exceeds the device's max message size {max_message}")
    if offset < 0 or offset + length > region_length:
        raise ValueError(
            f"local range [{offset}, {offset + length}) is outside the region of {region_length} bytes"
        )
    if remote_offset < 0 or remote_offset + length > remote_length:
        raise ValueError(
            f"remote range [{remote_offset}, {remote_offset + length}) "
            f"is outside the region of {remote_length} bytes"
        )


class RcConnection:
    """One reliable-connected QP to one peer, completing into the device's shared CQ."""

    def __init__(self, device: RdmaDevice, max_send_wr: int = 256):
        """Creates the QP in INIT state, accepting remote READ and WRITE; `max_send_wr` bounds the work
        posted and not yet polled. Raises RdmaError when the device's CQ cannot hold that many more."""
        device._check_open()
        if not 0 < max_send_wr <= device.max_qp_wr:
            raise ValueError(f"max_send_wr must be in [1, {device.max_qp_wr}], got {max_send_wr}")
        if device._cq_reserved + max_send_wr > device.cq_depth:
            raise RdmaError(
                f"completion queue of {device.cq_depth} entries has {device.cq_depth - device._cq_reserved} "
                f"left, {max_send_wr} asked"
            )
        v = device._v
        self.device = device
        self.max_send_wr = max_send_wr
        cap = v.QPCap(max_send_wr=max_send_wr, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init = v.QPInitAttr(qp_type=v.e.IBV_QPT_RC, scq=device._cq, rcq=device._cq, cap=cap, sq_sig_all=1)
        attr = v.QPAttr(port_num=device.port)
        attr.qp_access_flags = (
            v.e.IBV_ACCESS_LOCAL_WRITE | v.e.IBV_ACCESS_REMOTE_WRITE | v.e.IBV_ACCESS_REMOTE_READ
        )
        try:
            # NOTE: given a QPAttr, pyverbs' QP constructor moves an RC QP from RESET to INIT.
            self._qp = v.QP(device._pd, init, attr)
        except v.Error as exc:
            raise RdmaError(f"cannot create an RC QP: {exc}") from exc
        device._cq_reserved += max_send_wr
        self.qp_num = int(self._qp.qp_num)
        self.psn = random.getrandbits(24)
        device._completions[self.qp_num] = deque()
        self.inflight = 0
        self.connected = False
        self.closed = False

    def local_info(self) -> QpInfo:
        """What the peer passes to its `connect`."""
        d = self.device
        return QpInfo(
            lid=d.lid,
            qp_num=self.qp_num,
            psn=self.psn,
            gid=d.gid,
            port=d.port,
            gid_index=d.gid_index,
            mtu=d.active_mtu,
        )

    def connect(self, remote: QpInfo) -> None:
        """Moves the QP INIT -> RTR -> RTS towards the peer's QP; both sides call it with the other's info."""
        self._check_open()
        if self.connected:
            raise RdmaError("already connected")
        d = self.device
        v = d._v
        attr = v.QPAttr(port_num=d.port)
        attr.path_mtu = min(d.active_mtu, remote.mtu)
        attr.dest_qp_num = remote.qp_num
        attr.rq_psn = remote.psn
        attr.max_dest_rd_atomic = d.max_dest_rd_atomic
        attr.min_rnr_timer = _MIN_RNR_TIMER
        if gid_value(remote.gid):
            route = v.GlobalRoute(dgid=v.GID(remote.gid), sgid_index=d.gid_index, hop_limit=_HOP_LIMIT)
            attr.ah_attr = v.AHAttr(dlid=remote.lid, port_num=d.port, is_global=1, gr=route)
        else:
            # NOTE: without a GID the peer is addressed by LID alone, which only InfiniBand supports.
            attr.ah_attr = v.AHAttr(dlid=remote.lid, port_num=d.port)
        attr.timeout = _TIMEOUT
        attr.retry_cnt = _RETRY_CNT
        attr.rnr_retry = _RNR_RETRY
        attr.sq_psn = self.psn
        attr.max_rd_atomic = d.max_rd_atomic
        try:
            self._qp.to_rtr(attr)
            self._qp.to_rts(attr)
        except v.Error as exc:
            raise RdmaError(f"cannot connect QP {self.qp_num} to QP {remote.qp_num}: {exc}") from exc
        self.connected = True

    def post_write(
        self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote: RemoteRegion, remote_offset: int
    ) -> None:
        """RDMA WRITE of mr[offset:offset+length] to the remote region at `remote_offset`; its completion
        comes out of `poll` with `wr_id`. Raises ValueError for a range outside either region."""
        self._post(self.device._v.e.IBV_WR_RDMA_WRITE, wr_id, mr, offset, length, remote, remote_offset)

    def post_read(
        self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote: RemoteRegion, remote_offset: int
    ) -> None:
        """RDMA READ of `length` bytes of the remote region at `remote_offset` into mr[offset:]; see
        `post_write`."""
        self._post(self.device._v.e.IBV_WR_RDMA_READ, wr_id, mr, offset, length, remote, remote_offset)

    def poll(self, max_entries: int = 64) -> list[tuple[int, bool, str]]:
        """(wr_id, ok, status text) of up to `max_entries` completed work requests; never blocks. After a
        failed one the QP is in error and the rest of its work completes with a flush error."""
        self._check_open()
        done = self.device._reap(self.qp_num, max_entries)
        self.inflight -= len(done)
        return done

    def close(self) -> None:
        """Destroys the QP; work still in flight is abandoned."""
        if not self.closed:
            self.closed = True
            if not self.device.closed:
                self._qp.close()
                self.device._cq_reserved -= self.max_send_wr
                self.device._completions.pop(self.qp_num, None)

    def _check_open(self) -> None:
        self.device._check_open()
        if self.closed:
            raise RdmaError(f"connection of QP {self.qp_num} is closed")

    def _post(
        self,
        opcode,
        wr_id: int,
        mr: MemoryRegion,
        offset: int,
        length: int,
        remote: RemoteRegion,
        remote_offset: int,
    ) -> None:
        self._check_open()
        check_bounds(offset, length, mr.length, remote_offset, remote.length, self.device.max_message_size)
        if not 0 <= wr_id < 1 << 64:
            raise ValueError(f"wr_id must fit in 64 bits, got {wr_id}")
        if mr.closed or mr.device is not self.device:
            raise ValueError("memory region is closed or registered on another device")
        if not self.connected:
            raise RdmaError("not connected")
        if self.inflight >= self.max_send_wr:
            raise RdmaError(f"send queue full ({self.max_send_wr} work requests in flight): poll first")
        v = self.device._v
        # NOTE: pyverbs' SGE and SendWR free their C memory only in close() (never on garbage collection),
        # and a second close() frees it twice. SendWR copies the SGE, and the provider copies the WR.
        sge = v.SGE(mr.addr + offset, length, mr.lkey)
        try:
            wr = v.SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[sge], send_flags=v.e.IBV_SEND_SIGNALED)
        finally:
            sge.close()
        try:
            wr.set_wr_rdma(remote.rkey, remote.addr + remote_offset)
            self._qp.post_send(wr)
        except v.Error as exc:
            raise RdmaError(f"posting work request {wr_id} failed: {exc}") from exc
        finally:
            wr.close()
        self.inflight += 1
