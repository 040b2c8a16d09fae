"""The model workers' runtime (prefill, decode, and the colocated worker's halves): the service runtime plus
the transfer engine, the KV pool's prefix cache that follows the pool master, and the process's torch set-up."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client

from tsukimi.common import subjects
from tsukimi.common.messages import Heartbeat, decode
from tsukimi.common.service_runtime import ServiceRuntime, require_secret
from tsukimi.common.settings import Settings
from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import NatsMetadataStore


def prepare_worker(settings: Settings, command: str) -> None:
    """Process set-up of a model worker before its model loads: a usable secret, torch's thread count."""
    import torch

    require_secret(settings, command)
    torch.set_num_threads(settings.torch_threads)


class WorkerRuntime(ServiceRuntime):
    """A model worker's runtime. On shutdown its prefix cache closes, then its transfer engine, then what the
    worker registered with `on_close`."""

    def __init__(self, settings: Settings, instance_id: str, cache=None):
        super().__init__(instance_id)
        self.settings = settings
        self.transfer: TransferEngine | None = None
        # The pool's prefix cache (made in `start` when enabled), or a given one with the same interface (the
        # colocated worker's in-process cache: then the pool is not used).
        self.cache = cache
        self._has_own_cache = cache is not None

    async def start(self) -> Client:
        """Connects to NATS and starts the transfer engine (not yet published: decode adopts its arena
        first)."""
        nc = await self.connect(self.settings.nats_url)
        s = self.settings
        self.transfer = TransferEngine(
            self.instance_id, s.secret_bytes(), NatsMetadataStore(nc, s.segment_ttl_s), host=s.kv_host,
            port=s.kv_port, num_connections=s.transfer_connections, timeout_s=s.kv_transfer_timeout_s)
        await self.transfer.start()
        return nc

    async def open_cache(self, make_cache) -> None:
        """Makes the pool's prefix cache (`make_cache(transfer, settings)`) when the cache is enabled and none
        was given, and has it follow the pool master through cachestore heartbeats."""
        if not self.settings.is_cache_enabled or self._has_own_cache:
            return
        s = self.settings
        self.cache = make_cache(self.transfer, s.model_name(), s.cache_block_tokens, s.secret_bytes(),
                                s.cache_hold_leases, s.cache_reserve_bytes)
        await self.nc.subscribe(subjects.heartbeat("cachestore", "*"), cb=self._on_cachestore)

    async def _on_cachestore(self, msg) -> None:
        try:
            self.cache.follow(decode(msg.data, Heartbeat))
        except msgspec.ValidationError:
            return

    async def _close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        if self.transfer is not None:
            await self.transfer.close()
        await super()._close()
