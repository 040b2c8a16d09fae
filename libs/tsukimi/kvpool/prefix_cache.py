"""The model workers' use of the KV cache pool (prefill's and decode's): load the longest cached prefix of a
prompt, store the blocks computed.

Through `PoolClient` over a `PoolSession` (the calls `tsukimi bench cachestore` measures; on the master's
session lane when given the cluster secret): a load is one
prefix BatchGet (the leading run of present blocks, leased) and the reads; a store is one BatchPutStart and the
writes (from a staging buffer the KV is packed into, or straight from a registered arena already in the pool's
block layout: `store_blocks`); put ends and lease releases ride on the next call. Block bytes move through the
transfer engine. Any failure to reach the pool degrades to computing the whole prompt: the pool is an
accelerator, never a dependency.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import torch

from tsukimi.kvpool.block_keys import BlockKey, block_keys
from tsukimi.kvpool.checksum import block_checksum
from tsukimi.common.messages import Heartbeat, KVLayout
from tsukimi.kvpool.pool_client import PoolClient
from tsukimi.kvpool.pool_session import PoolSession
from tsukimi.model.kv import join_blocks, layout_of, to_blocks
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.engine import LocalBuffer, TransferEngine

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 2.0


class PrefixCache:
    """Loads and stores KV blocks of prompts for one model."""

    def __init__(self, transfer: TransferEngine, model: str, block_tokens: int, secret: bytes | None = None,
                 hold_leases: int = 0, reserve_bytes: int = 0):
        """`secret`: the cluster secret, for the pool master's session lane (None: its gRPC stream);
        `hold_leases`, `reserve_bytes`: see `PoolClient`."""
        self.transfer = transfer
        self._secret = secret
        self._hold_leases = hold_leases
        self._reserve_bytes = reserve_bytes
        self.model = model
        self.block_tokens = block_tokens
        self._address = ""
        # Cachestore instance whose API `_address` is (the pool master), when followed through heartbeats.
        self._master_id = ""
        self._channel: grpc.aio.Channel | None = None
        self._session: PoolSession | None = None
        self._client: PoolClient | None = None
        # Retirements of the clients of masters no longer followed, kept until done.
        self._pending: set[asyncio.Task] = set()

    def use(self, address: str) -> None:
        """Talk to the cachestore at `address` (from its heartbeat); "" forgets it."""
        if address == self._address:
            return
        self._address = address
        if self._channel is not None:
            # NOTE: operations under way on the old master end with its channel (as failed loads or stores).
            self._spawn(self._retire(self._client, self._session, self._channel))
        self._channel = self._session = self._client = None
        if address:
            self._channel = grpc.aio.insecure_channel(address)
            self._session = PoolSession(pb_grpc.CacheStoreStub(self._channel), self._secret)
            self._client = PoolClient(self._session, self.transfer, rpc_timeout_s=RPC_TIMEOUT_S,
                                      hold_leases=self._hold_leases, reserve_bytes=self._reserve_bytes)

    @property
    def is_available(self) -> bool:
        return self._client is not None

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
        """Sends the put ends and releases still pending and closes the channel."""
        self.use("")
        if self._pending:
            await asyncio.wait(self._pending, timeout=2 * RPC_TIMEOUT_S)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @staticmethod
    async def _retire(client: PoolClient | None, session: PoolSession | None, channel: grpc.aio.Channel) -> None:
        try:
            if client is not None:
                await client.close()  # NOTE: waits for its operations, then sends what they left behind.
        finally:
            if session is not None:
                await session.close()
            await channel.close()

    async def load(self, prompt: list[int], block_layout: KVLayout
                   ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """KV of the longest cached prefix of `prompt` (whole blocks, leaving at least one token to compute),
        or None."""
        client = self._client
        if client is None:
            return None
        keys = block_keys(prompt, self.block_tokens, self.model)[: (len(prompt) - 1) // self.block_tokens]
        if not keys:
            return None
        size = block_layout.num_bytes
        staging = np.empty(len(keys) * size, dtype=np.uint8)
        # NOTE: shielded: a cancelled caller leaves the reads to finish before the buffer is withdrawn.
        read = await asyncio.shield(self._read(client, keys, staging, size))
        if read is None:
            return None
        # NOTE: a block that failed its read or checksum ends the usable prefix (PoolClient logs and drops it).
        num = next((i for i, ok in enumerate(read) if not ok), len(read))
        if num == 0:
            return None
        return join_blocks(block_layout, [staging[i * size:(i + 1) * size] for i in range(num)])

    async def _read(self, client: PoolClient, keys: list[BlockKey], staging: np.ndarray, size: int
                    ) -> list[bool] | None:
        local = self.transfer.register(staging)
        try:
            return await client.get_many(keys, local, [i * size for i in range(len(keys))], [size] * len(keys),
                                         verify=True, is_prefix=True)
        except grpc.aio.AioRpcError as exc:
            log.warning("cache lookup failed, computing the whole prompt: %s", exc.code().name)
            return None
        finally:
            self.transfer.unregister(local)

    async def store(self, prompt: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]], num_cached_blocks: int
                    ) -> int:
        """Stores the full blocks of `prompt` after the first `num_cached_blocks`; returns how many it stored
        (they become visible with their put end, on the next call or within the client's linger)."""
        client = self._client
        if client is None:
            return 0
        bt = self.block_tokens
        keys = block_keys(prompt, bt, self.model)
        keys = keys[num_cached_blocks:min(len(keys), kv[0][0].shape[2] // bt)]
        if not keys:
            return 0
        start, end = num_cached_blocks * bt, (num_cached_blocks + len(keys)) * bt
        # NOTE: the new full blocks packed straight into one staging buffer (one copy of the KV).
        staging = to_blocks([(k[:, :, start:end], v[:, :, start:end]) for k, v in kv], bt).view(torch.uint8)
        staging = staging.reshape(-1).numpy()
        size = staging.nbytes // len(keys)
        offsets = [i * size for i in range(len(keys))]
        checksums = [block_checksum(staging[o:o + size]) for o in offsets]
        return await asyncio.shield(self._write(client, keys, staging, offsets, size, checksums))

    async def store_blocks(self, prompt: list[int], arena: LocalBuffer, offsets: list[int], block_bytes: int,
                           num_cached_blocks: int) -> int:
        """As `store`, for blocks that already lie in the pool's block layout in `arena`, a buffer the transfer
        engine registered (decode's KV blocks): they are written to the pool straight from there, no copy.
        `offsets[i]` is where block `num_cached_blocks + i` of `prompt` starts in it. The blocks must not change
        until this returns; it returns only once their writes are over, even when its caller is cancelled."""
        client = self._client
        if client is None:
            return 0
        keys = block_keys(prompt, self.block_tokens, self.model)[num_cached_blocks:][:len(offsets)]
        if not keys:
            return 0
        offsets = offsets[:len(keys)]
        array = arena.array
        checksums = [block_checksum(array[o:o + block_bytes]) for o in offsets]
        write = asyncio.ensure_future(self._put(client, keys, arena, offsets, block_bytes, checksums))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])  # NOTE: the caller may reuse the blocks once this returns.
            raise

    async def _write(self, client: PoolClient, keys: list[BlockKey], staging: np.ndarray, offsets: list[int],
                     size: int, checksums: list[str]) -> int:
        local = self.transfer.register(staging, read_only=True)
        try:
            return await self._put(client, keys, local, offsets, size, checksums)
        finally:
            self.transfer.unregister(local)

    @staticmethod
    async def _put(client: PoolClient, keys: list[BlockKey], local: LocalBuffer, offsets: list[int], size: int,
                   checksums: list[str]) -> int:
        try:
            # NOTE: blocks the pool holds already (or had no room for) come back False: nothing written.
            written = await client.put_many(keys, local, offsets, [size] * len(keys), checksums)
        except grpc.aio.AioRpcError as exc:
            log.info("cache puts refused: %s", exc.details())
            return 0
        return sum(written)


def block_layout_of(kv: list[tuple[torch.Tensor, torch.Tensor]], block_tokens: int) -> KVLayout:
    """Layout of one block of this model's KV."""
    full = layout_of(kv)
    return KVLayout(full.num_layers, full.num_kv_heads, block_tokens, full.head_dim, full.dtype)
