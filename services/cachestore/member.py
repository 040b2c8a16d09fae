"""One instance of the pool as its master sees it: the byte movements the master orders on an instance's own
memory (DRAM range -> SSD file, SSD file -> DRAM range, another instance's DRAM -> this DRAM, file deletion) and
the inventory of its SSD tier.

`LocalMember` does them on this process's tiers; `RemoteMember` asks another instance over its `PoolMember`
gRPC API, which `MemberServicer` serves from that instance's `LocalMember`. Must not import torch.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import grpc

from tsukimi.cachestore.ssd_tier import SsdBlock, SsdError, SsdTier
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.engine import LocalBuffer, TransferEngine, TransferError

# Seconds a master waits for one movement on a remote instance.
MEMBER_RPC_TIMEOUT_S = 30.0


class MemberError(Exception):
    """A movement failed on the instance (disk error, bad checksum, unreachable peer); the replica it was
    making must be dropped."""


class Member(Protocol):
    """What the master orders an instance to do."""

    async def demote(self, key: bytes, dram_offset: int, size: int, checksum: str) -> None:
        """Copies a DRAM range to the SSD tier under `key`."""

    async def promote(self, key: bytes, dram_offset: int, size: int) -> None:
        """Copies an SSD block into a DRAM range, verifying its checksum."""

    async def copy_in(self, key: bytes, segment: str, buffer_id: int, offset: int, size: int,
                      dram_offset: int) -> None:
        """Reads another instance's bytes into a DRAM range through the transfer engine."""

    async def delete_ssd(self, keys: list[bytes]) -> None:
        """Deletes SSD blocks (missing ones are fine)."""

    async def list_ssd(self) -> list[SsdBlock]:
        """Every block the SSD tier holds."""

    async def close(self) -> None: ...


class LocalMember:
    """This process's DRAM segment and optional SSD tier."""

    def __init__(self, transfer: TransferEngine, dram: LocalBuffer, ssd: SsdTier | None):
        self.transfer = transfer
        self.dram = dram
        self.ssd = ssd

    def _range(self, offset: int, size: int) -> memoryview:
        if offset < 0 or size <= 0 or offset + size > self.dram.length:
            raise MemberError(f"range {offset}+{size} is outside the {self.dram.length}-byte DRAM segment")
        return self.dram.view[offset:offset + size]

    def _require_ssd(self) -> SsdTier:
        if self.ssd is None:
            raise MemberError("this instance has no SSD tier")
        return self.ssd

    async def demote(self, key: bytes, dram_offset: int, size: int, checksum: str) -> None:
        ssd, view = self._require_ssd(), self._range(dram_offset, size)
        try:
            await asyncio.to_thread(ssd.write, SsdBlock(key, size, checksum), view)
        except (SsdError, OSError) as exc:
            raise MemberError(f"demotion to SSD failed: {exc}") from exc

    async def promote(self, key: bytes, dram_offset: int, size: int) -> None:
        ssd, view = self._require_ssd(), self._range(dram_offset, size)
        try:
            await asyncio.to_thread(ssd.read_into, key, view)
        except (SsdError, OSError) as exc:
            raise MemberError(f"promotion from SSD failed: {exc}") from exc

    async def copy_in(self, key: bytes, segment: str, buffer_id: int, offset: int, size: int,
                      dram_offset: int) -> None:
        self._range(dram_offset, size)
        try:
            await self.transfer.read(self.dram, dram_offset, segment, buffer_id, offset, size)
        except (TransferError, OSError, LookupError) as exc:
            raise MemberError(f"copy from {segment} failed: {exc}") from exc

    async def delete_ssd(self, keys: list[bytes]) -> None:
        if self.ssd is not None and keys:
            await asyncio.to_thread(lambda: [self.ssd.delete(k) for k in keys])

    async def list_ssd(self) -> list[SsdBlock]:
        return self.ssd.blocks() if self.ssd is not None else []

    async def close(self) -> None:
        pass


class RemoteMember:
    """Another instance, over its PoolMember gRPC API."""

    def __init__(self, address: str, timeout_s: float = MEMBER_RPC_TIMEOUT_S):
        self.address = address
        self._timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.PoolMemberStub(self._channel)

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise MemberError(f"instance at {self.address}: {exc.code().name}: {exc.details()}") from exc

    async def demote(self, key: bytes, dram_offset: int, size: int, checksum: str) -> None:
        await self._call(self._stub.Demote, pb.MoveRequest(key=key, dram_offset=dram_offset, size=size,
                                                          checksum=checksum))

    async def promote(self, key: bytes, dram_offset: int, size: int) -> None:
        await self._call(self._stub.Promote, pb.MoveRequest(key=key, dram_offset=dram_offset, size=size))

    async def copy_in(self, key: bytes, segment: str, buffer_id: int, offset: int, size: int,
                      dram_offset: int) -> None:
        await self._call(self._stub.CopyIn, pb.CopyInRequest(key=key, segment=segment, buffer_id=buffer_id,
                                                            offset=offset, size=size, dram_offset=dram_offset))

    async def delete_ssd(self, keys: list[bytes]) -> None:
        if keys:
            await self._call(self._stub.DeleteSsd, pb.KeysRequest(keys=keys))

    async def list_ssd(self) -> list[SsdBlock]:
        reply = await self._call(self._stub.ListSsd, pb.Empty())
        return [SsdBlock(b.key, b.size, b.checksum) for b in reply.blocks]

    async def close(self) -> None:
        await self._channel.close()


class MemberServicer(pb_grpc.PoolMemberServicer):
    """Serves this instance's `LocalMember` to the pool master."""

    def __init__(self, member: LocalMember):
        self.member = member

    async def _run(self, context, coro):
        try:
            await coro
        except MemberError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.Empty()

    async def Demote(self, request, context):
        return await self._run(context, self.member.demote(request.key, request.dram_offset, request.size,
                                                           request.checksum))

    async def Promote(self, request, context):
        return await self._run(context, self.member.promote(request.key, request.dram_offset, request.size))

    async def CopyIn(self, request, context):
        return await self._run(context, self.member.copy_in(request.key, request.segment, request.buffer_id,
                                                            request.offset, request.size, request.dram_offset))

    async def DeleteSsd(self, request, context):
        return await self._run(context, self.member.delete_ssd(list(request.keys)))

    async def ListSsd(self, request, context):
        blocks = await self.member.list_ssd()
        return pb.SsdListReply(blocks=[pb.SsdBlock(key=b.key, size=b.size, checksum=b.checksum) for b in blocks])
