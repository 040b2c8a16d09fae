"""In-process stand-ins for pyverbs, shared by the RDMA transport tests: an RC QP moves bytes with memmove and
completes into its CQ, so the glue over pyverbs runs where no RDMA device exists."""

from __future__ import annotations

import ctypes
import enum
import itertools
import types
from collections import deque


class _WcStatus(enum.IntEnum):
    IBV_WC_SUCCESS = 0
    IBV_WC_WR_FLUSH_ERR = 5
    IBV_WC_REM_ACCESS_ERR = 10


def _fake_verbs() -> types.SimpleNamespace:
    """In-process stand-ins, with pyverbs' signatures, for the calls rdma.py makes: an RC QP moves bytes
    with memmove and completes into its CQ, so the glue logic runs where no device exists."""
    regions: dict[int, tuple[int, int, int]] = {}
    qps: dict = {}
    keys = itertools.count(0x100)
    work: list = []

    def record(**fields):
        return types.SimpleNamespace(**fields)

    def QPCap(max_send_wr=1, max_recv_wr=10, max_send_sge=1, max_recv_sge=1, max_inline_data=0):
        return record(max_send_wr=max_send_wr)

    def QPInitAttr(qp_type=4, qp_context=None, scq=None, rcq=None, srq=None, cap=None, sq_sig_all=1):
        assert qp_type == 2 and scq is rcq and sq_sig_all == 1
        return record(scq=scq, cap=cap)

    def QPAttr(qp_state=1, cur_qp_state=0, port_num=1, path_mtu=3):
        return record(port_num=port_num, path_mtu=path_mtu)

    def AHAttr(dlid=0, sl=0, src_path_bits=0, static_rate=0, is_global=0, port_num=1, gr=None):
        assert bool(is_global) == (gr is not None)
        return record(dlid=dlid, gr=gr)

    def GlobalRoute(dgid=None, flow_label=0, sgid_index=0, hop_limit=1, traffic_class=0):
        return record(dgid=dgid, sgid_index=sgid_index)

    class Context:
        def __init__(self, **kwargs):
            self.name = kwargs["name"]

        def query_device(self):
            return record(max_qp_wr=1024, max_qp_init_rd_atom=8, max_qp_rd_atom=8, max_cqe=512)

        def query_port(self, port_num):
            return record(state=4, lid=0, active_mtu=5, max_msg_sz=1 << 16, link_layer=2)

        def query_gid(self, port_num, index):
            return "fe80:0000:0000:0000:0000:0000:0000:0001"

        def close(self):
            for qp in list(qps.values()):
                qp.close()

    class CQ:
        def __init__(self, context, cqe, cq_context=None, channel=None, comp_vector=0):
            self.cqe = cqe
            self.wcs: deque = deque()

        def poll(self, num_entries=1):
            wcs = [self.wcs.popleft() for _ in range(min(num_entries, len(self.wcs)))]
            return len(wcs), wcs

    class MR:
        def __init__(self, creator, length=0, access=0, address=None, implicit=False, **kwargs):
            self.lkey = self.rkey = next(keys)
            regions[self.rkey] = (address, length, access)

        def close(self):
            regions.pop(self.rkey, None)

    class QP:
        def __init__(self, creator, init_attr, qp_attr=None):
            self.qp_num = next(keys)
            self.cq = init_attr.scq
            self.depth = init_attr.cap.max_send_wr
            self.access = qp_attr.qp_access_flags
            self.state = "INIT"
            qps[self.qp_num] = self

        def to_rtr(self, qp_attr):
            assert self.state == "INIT" and qp_attr.path_mtu == 5 and qp_attr.ah_attr.gr.sgid_index == 0
            self.peer, self.rq_psn, self.state = qps[qp_attr.dest_qp_num], qp_attr.rq_psn, "RTR"

        def to_rts(self, qp_attr):
            assert self.state == "RTR"
            self.sq_psn, self.state = qp_attr.sq_psn, "RTS"

        def post_send(self, wr):
            assert self.state in ("RTS", "ERR") and len(self.cq.wcs) < self.cq.cqe
            addr, length, access = regions.get(wr.rkey, (0, 0, 0))
            needed = 2 if wr.opcode == 0 else 4
            status = 5 if self.state == "ERR" else 0
            if not status and (
                not access & needed & self.peer.access or wr.remote + wr.length > addr + length
            ):
                status, self.state = 10, "ERR"
            if not status:
                source, target = (wr.local, wr.remote) if wr.opcode == 0 else (wr.remote, wr.local)
                ctypes.memmove(target, source, wr.length)
            self.cq.wcs.append(record(wr_id=wr.wr_id, status=status, qp_num=self.qp_num, vendor_err=0))

        def close(self):
            qps.pop(self.qp_num, None)

    class Freed:
        def close(self):
            assert not self.freed, "freed twice"
            self.freed = True

    class SGE(Freed):
        def __init__(self, addr, length, lkey):
            assert lkey in regions
            self.addr, self.length, self.freed = addr, length, False
            work.append(self)

    class SendWR(Freed):
        def __init__(self, wr_id=0, opcode=2, num_sge=0, imm_data=0, sg=None, send_flags=2, next_wr=None):
            [sge] = sg
            assert num_sge == 1 and send_flags == 2 and not sge.freed
            self.wr_id, self.opcode, self.local, self.length, self.freed = (
                wr_id,
                opcode,
                sge.addr,
                sge.length,
                False,
            )
            work.append(self)

        def set_wr_rdma(self, rkey, addr):
            self.rkey, self.remote = rkey, addr

    e = types.SimpleNamespace(
        IBV_PORT_ACTIVE=4,
        IBV_LINK_LAYER_ETHERNET=2,
        IBV_ACCESS_LOCAL_WRITE=1,
        IBV_ACCESS_REMOTE_WRITE=2,
        IBV_ACCESS_REMOTE_READ=4,
        IBV_QPT_RC=2,
        IBV_WR_RDMA_WRITE=0,
        IBV_WR_RDMA_READ=4,
        IBV_SEND_SIGNALED=2,
        IBV_WC_SUCCESS=0,
        ibv_wc_status=_WcStatus,
    )
    return types.SimpleNamespace(
        Context=Context,
        get_device_list=lambda: [types.SimpleNamespace(name=b"fake0")],
        GID=str,
        GlobalRoute=GlobalRoute,
        AHAttr=AHAttr,
        CQ=CQ,
        MR=MR,
        PD=lambda creator: record(),
        QP=QP,
        QPCap=QPCap,
        QPInitAttr=QPInitAttr,
        QPAttr=QPAttr,
        SGE=SGE,
        SendWR=SendWR,
        Error=type("PyverbsError", (Exception,), {}),
        e=e,
        work=work,
    )
