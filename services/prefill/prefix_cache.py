"""Prefill's use of the KV cache pool: load the longest cached prefix of a prompt, store the blocks it computed.

Metadata goes over the cachestore's gRPC API; block bytes through the transfer engine. Any failure to reach
the pool degrades to computing the whole prompt: the pool is an accelerator, never a dependency.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import torch

from tsukimi.common.block_keys import block_keys
from tsukimi.common.checksum import block_checksum
from tsukimi.common.messages import Heartbeat, KVLayout
from tsukimi.model.kv import join_blocks, layout_of, split_blocks
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.batch import Op, Status, TransferRequest
from tsukimi.transfer.engine import TransferEngine

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 2.0


class PrefixCache:
    """Loads and stores KV blocks of prompts for one model."""

    def __init__(self, transfer: TransferEngine, model: str, block_tokens: int):
        self.transfer = transfer
        self.model = model
        self.block_tokens = block_tokens
        self._address = ""
        # Cachestore instance whose API `_address` is (the pool master), when followed through heartbeats.
        self._master_id = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.CacheStoreStub | None = None
        # Calls nobody waits for (lease releases), kept until done.
        self._pending: set[asyncio.Task] = set()

    def use(self, address: str) -> None:
        """Talk to the cachestore at `address` (from its heartbeat); "" forgets it."""
        if address == self._address:
            return
        self._address = address
        if self._channel is not None:
            # NOTE: calls under way on the old channel end with it (as failed lookups or stores).
            self._spawn(self._channel.close())
        self._channel = grpc.aio.insecure_channel(address) if address else None
        self._stub = pb_grpc.CacheStoreStub(self._channel) if address else None

    @property
    def is_available(self) -> bool:
        return self._stub is not None

    def follow(self, beat: Heartbeat) -> None:
        """Follows the pool master through cachestore heartbeats: metadata calls go to the master, and any
        instance may become it (another takes over when the master dies)."""
        is_current = self._master_id == beat.instance_id
        if beat.is_pool_master and beat.grpc_address and not beat.is_leaving:
            if not is_current or not self.is_available:
                log.info("using the cache pool master %s at %s", beat.instance_id, beat.grpc_address)
                self._master_id = beat.instance_id
                self.use(beat.grpc_address)
        elif is_current and self.is_available:
            log.info("cachestore %s is no longer the pool master; the pool is off until a master speaks",
                     beat.instance_id)
            self._master_id = ""
            self.use("")

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=RPC_TIMEOUT_S)
        if self._channel is not None:
            await self._channel.close()

    async def load(self, prompt: list[int], block_layout: KVLayout
                   ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """KV of the longest cached prefix of `prompt` (whole blocks, leaving at least one token to compute),
        or None."""
        if self._stub is None:
            return None
        keys = block_keys(prompt, self.block_tokens, self.model)[: (len(prompt) - 1) // self.block_tokens]
        if not keys:
            return None
        try:
            found = await self._stub.Lookup(pb.LookupRequest(keys=keys), timeout=RPC_TIMEOUT_S)
            num = found.num_leading
            if num == 0:
                return None
            gets = list((await self._stub.BatchGet(pb.KeysRequest(keys=keys[:num]), timeout=RPC_TIMEOUT_S)).gets)
        except grpc.aio.AioRpcError as exc:
            log.warning("cache lookup failed, computing the whole prompt: %s", exc.code().name)
            return None
        num = next((i for i, g in enumerate(gets) if not g.found), len(gets))
        size = block_layout.num_bytes
        staging = np.empty(num * size, dtype=np.uint8)
        local = self.transfer.register(staging)
        try:
            requests = []
            for i, got in enumerate(gets[:num]):
                replica = got.replicas[0]
                requests.append(TransferRequest(Op.READ, local, i * size, replica.segment, replica.buffer_id,
                                                replica.offset, size))
            statuses = await self.transfer.wait(await self.transfer.submit(requests)) if requests else []
        finally:
            self.transfer.unregister(local)
            # NOTE: nobody waits for the release (the bytes are ours now); leases expire anyway if it is lost.
            self._spawn(self._release(keys, gets))
        good = 0
        for i, st in enumerate(statuses):
            block = staging[i * size:(i + 1) * size]
            if st.status != Status.COMPLETED or block_checksum(block) != gets[i].checksum:
                log.warning("cached block %d unusable (%s); using %d blocks", i, st.error or "checksum", good)
                if st.status == Status.COMPLETED:
                    await self._drop(keys[i], gets[i].replicas[0])  # a miss, and that copy is bad
                break
            good += 1
        if good == 0:
            return None
        return join_blocks(block_layout, [staging[i * size:(i + 1) * size] for i in range(good)])

    async def _drop(self, key: bytes, replica) -> None:
        try:
            await self._stub.DropReplica(pb.DropReplicaRequest(key=key, replica=replica), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            pass

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _release(self, keys, gets) -> None:
        releases = [pb.ReleaseRequest(key=k, lease_id=g.lease_id) for k, g in zip(keys, gets) if g.found]
        try:
            await self._stub.BatchRelease(pb.BatchReleaseRequest(releases=releases), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            pass  # NOTE: leases expire by themselves.

    async def store(self, prompt: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]], num_cached_blocks: int
                    ) -> int:
        """Stores the full blocks of `prompt` after the first `num_cached_blocks`; returns how many it stored."""
        if self._stub is None:
            return 0
        keys = block_keys(prompt, self.block_tokens, self.model)
        blocks = split_blocks(kv, self.block_tokens)[num_cached_blocks:len(keys)]
        keys = keys[num_cached_blocks:]
        if not keys:
            return 0
        datas = [block.numpy() for block in blocks]
        try:
            started = (await self._stub.BatchPutStart(pb.BatchPutStartRequest(puts=[pb.PutStartRequest(
                key=k, size=d.nbytes, checksum=block_checksum(d), num_replicas=1) for k, d in zip(keys, datas)]),
                timeout=RPC_TIMEOUT_S)).puts
        except grpc.aio.AioRpcError as exc:
            log.info("cache puts refused: %s", exc.details())
            return 0
        # Blocks that exist already (or did not fit) come back without replicas: nothing to write.
        todo = [(k, d, p.replicas[0]) for k, d, p in zip(keys, datas, started) if p.replicas]
        if not todo:
            return 0
        locals_ = [self.transfer.register(d, read_only=True) for _, d, _ in todo]
        try:
            statuses = await self.transfer.wait(await self.transfer.submit([
                TransferRequest(Op.WRITE, local, 0, r.segment, r.buffer_id, r.offset, d.nbytes)
                for local, (_, d, r) in zip(locals_, todo)]))
        finally:
            for local in locals_:
                self.transfer.unregister(local)
        written = [k for (k, _, _), st in zip(todo, statuses) if st.status == Status.COMPLETED]
        failed = [k for (k, _, _), st in zip(todo, statuses) if st.status != Status.COMPLETED]
        try:
            if written:
                await self._stub.BatchPutEnd(pb.KeysRequest(keys=written), timeout=RPC_TIMEOUT_S)
            if failed:
                log.warning("%d KV blocks could not be written to the pool; revoked", len(failed))
                await self._stub.BatchPutRevoke(pb.KeysRequest(keys=failed), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.warning("finishing cache puts failed: %s", exc.code().name)
            return 0
        num_stored = len(written)
        return num_stored


def block_layout_of(kv: list[tuple[torch.Tensor, torch.Tensor]], block_tokens: int) -> KVLayout:
    """Layout of one block of this model's KV."""
    full = layout_of(kv)
    return KVLayout(full.num_layers, full.num_kv_heads, block_tokens, full.head_dim, full.dtype)
