"""Decode's finished blocks go to the pool straight from its arena (no copy): the bytes the pool holds are the
arena's blocks, byte for byte, and what the copying path would have stored; the decode service keeps those blocks
out of the free list until they are written. In process: a real pool servicer, no broker."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import torch
from tsukimi.cachestore.master import PoolMaster
from tsukimi.cachestore.member import LocalMember
from tsukimi.cachestore.pool import Instance, Pool
from tsukimi.cachestore.servicer import CacheStoreServicer
from tsukimi.common.messages import KVLayout, SamplingParams
from tsukimi.common.settings import Settings
from tsukimi.decode.engine import DecodeEngine
from tsukimi.decode.kv_blocks import KVBlocks
from tsukimi.decode.service import DecodeService
from tsukimi.kvpool.block_keys import block_keys
from tsukimi.kvpool.checksum import block_checksum
from tsukimi.kvpool.prefix_cache import PrefixCache
from tsukimi.model.kv import block_layout, to_blocks
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import MemoryMetadataStore

from tests.unit.test_decode_room_beats import kv_of, tiny_service

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, seq_len=4, head_dim=8, dtype="float32")


async def test_the_pool_holds_the_arena_blocks_byte_for_byte():
    metadata = MemoryMetadataStore()
    store_engine = await TransferEngine("pool", b"s", metadata, transports=("shm",)).start()
    dram = store_engine.allocate(64 * LAYOUT.num_bytes)
    await store_engine.publish()
    master = PoolMaster()
    pool = Pool(master)
    await pool.join("a", Instance(LocalMember(store_engine, dram, None), "pool", dram.buffer_id), dram.length, 0)
    server = grpc.aio.server()
    pb_grpc.add_CacheStoreServicer_to_server(CacheStoreServicer(pool), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    engine = await TransferEngine("decode", b"s", metadata, transports=("shm",)).start()
    # As decode's service does: the blocks in shared memory, adopted and guarded by the worker's engine.
    kv = KVBlocks.shared(LAYOUT, 8 * LAYOUT.num_bytes)
    arena = engine.adopt(kv.region)
    engine.guard(arena, kv.block_bytes)
    await engine.publish()
    cache = PrefixCache(engine, "demo", block_tokens=4)
    cache.use(f"127.0.0.1:{port}")
    try:
        torch.manual_seed(0)
        layers = [(torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)) for _ in range(2)]
        block_ids = [5, 2, 0, 3]  # out of order, not contiguous
        kv.write(block_ids, layers)
        prompt = list(range(100, 116))  # 4 full blocks
        # The first block as prefill stores it (packed into a staging buffer); the other three from the arena.
        assert await cache.store(prompt[:4], [(k[:, :, :4], v[:, :, :4]) for k, v in layers], 0) == 1
        offsets = [kv.offset_of(b) for b in block_ids[1:]]
        assert await cache.store_blocks(prompt, arena, offsets, kv.block_bytes, num_cached_blocks=1) == 3
        await cache._client.flush()
        keys = block_keys(prompt, 4, "demo")
        size = kv.block_bytes
        copied = to_blocks(kv.read(block_ids, 16), 4).view(torch.uint8).reshape(4, -1).numpy()
        for i, block_id in enumerate(block_ids):
            (replica,) = master.replicas(keys[i])
            held = dram.array[replica.offset:replica.offset + size]
            in_arena = arena.array[kv.offset_of(block_id):kv.offset_of(block_id) + size]
            assert np.array_equal(held, in_arena) and np.array_equal(held, copied[i])
            assert master.checksum(keys[i]) == block_checksum(in_arena)
        loaded = await cache.load(prompt + [1], LAYOUT)
        assert all(torch.equal(a, b) for got, want in zip(loaded, layers) for a, b in zip(got, want))
        # Nothing asked past the blocks given; none with no client.
        assert await cache.store_blocks(prompt, arena, [], size, 1) == 0
    finally:
        await cache.close()
        await server.stop(None)
        await engine.close()
        await store_engine.close()


class RecordingCache:
    """The pool's prefix cache as decode sees it, recording `store_blocks` and holding it until `release`."""

    is_available = True

    def __init__(self, engine: DecodeEngine):
        self.engine = engine
        self.calls = []
        self.release = asyncio.Event()
        self.num_free_while_stored: int | None = None

    async def store_blocks(self, prompt, arena, offsets, block_bytes, num_cached_blocks) -> int:
        self.calls.append((list(prompt), arena, list(offsets), block_bytes, num_cached_blocks))
        await self.release.wait()
        self.num_free_while_stored = self.engine.kv.manager.num_free_blocks
        return len(offsets)

    async def store(self, *args):  # the copying path: not taken here
        raise AssertionError("the blocks were copied")


async def test_decode_keeps_the_answer_s_blocks_until_written_then_frees_them():
    service, engine, _ = tiny_service(num_blocks=32)
    cache = service.runtime.cache = RecordingCache(engine)
    service._can_store_from_arena = True
    service.arena = "arena"
    service._loop = asyncio.get_running_loop()
    prompt = list(range(1, 11))  # 10 tokens: blocks 0-1 full, block 2 partial
    seq = engine.sequence_with_kv("a", SamplingParams(temperature=0.0, max_tokens=5), kv_of(engine, 10), 1,
                                  token_ids=prompt)
    block_ids = list(seq.block_ids)
    service._arrived = [seq]
    while engine.has_work() or service._arrived:
        await service._step()
    await asyncio.sleep(0)
    # 14 tokens held at the end (10 + 4 of the 5 outputs): blocks 0-2 full, of which 2 is the answer's only.
    ((tokens, arena, offsets, block_bytes, num_cached),) = cache.calls
    assert tokens == seq.token_ids[:12] and arena == "arena" and num_cached == 2
    assert offsets == [engine.kv.offset_of(block_ids[2])] and block_bytes == engine.kv.block_bytes
    assert engine.kv.manager.num_free_blocks == 31  # the stored one is kept until written
    cache.release.set()
    await asyncio.gather(*service.runtime.background)
    assert cache.num_free_while_stored == 31 and engine.kv.manager.num_free_blocks == 32
