"""The prefill's pool client closes the channel to a master it stops following."""

import asyncio

import grpc

from tsukimi.kvpool.prefix_cache import PrefixCache


async def test_switching_masters_closes_the_old_channel():
    cache = PrefixCache(transfer=None, model="demo", block_tokens=16)
    cache.use("127.0.0.1:1")
    old = cache._channel
    cache.use("127.0.0.1:2")
    assert cache._channel is not old and cache.is_available
    await asyncio.wait_for(asyncio.gather(*cache._pending), 5)
    assert old.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    cache.use("")
    assert not cache.is_available
    await cache.close()
