"""Where segment descriptors live: a NATS JetStream key-value bucket with a TTL (Mooncake's metadata service).

A live engine re-publishes its descriptor every TTL/3; a dead one's descriptor expires with the TTL.
"""

from __future__ import annotations

import logging
import re
from typing import Protocol

import msgspec
from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from tsukimi.transfer.descriptor import SegmentDescriptor

log = logging.getLogger(__name__)

BUCKET = "tsukimi_segments"
# Seconds a metadata-store call may take.
METADATA_TIMEOUT_S = 3.0
_KEY_OK = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


class MetadataStore(Protocol):
    async def put(self, descriptor: SegmentDescriptor) -> None: ...
    async def get(self, name: str) -> SegmentDescriptor | None: ...
    async def delete(self, name: str) -> None: ...


def _key(name: str) -> str:
    if not _KEY_OK.match(name):
        raise ValueError(f"segment name {name!r} may only use letters, digits and -/_=.")
    return name


class NatsMetadataStore:
    """Descriptors in a JetStream KV bucket whose entries expire after `ttl_s`."""

    def __init__(self, nc: Client, ttl_s: float = 10.0, bucket: str = BUCKET):
        self._nc = nc
        self.ttl_s = ttl_s
        self._bucket_name = bucket
        self._kv = None

    async def _bucket(self):
        if self._kv is None:
            js = self._nc.jetstream()
            try:
                kv = await js.key_value(self._bucket_name)
            except BucketNotFoundError:
                kv = await js.create_key_value(bucket=self._bucket_name, ttl=self.ttl_s, history=1)
            # NOTE: a bucket's TTL is fixed by whoever created it; refresh on the TTL it really has.
            actual = (await kv.status()).ttl
            if actual and abs(actual - self.ttl_s) > 1e-3:
                log.warning("segment bucket %s keeps entries %.1fs, not the configured %.1fs: using %.1fs",
                            self._bucket_name, actual, self.ttl_s, actual)
                self.ttl_s = actual
            self._kv = kv
        return self._kv

    async def open(self) -> "NatsMetadataStore":
        """Opens (or creates) the bucket now, so `ttl_s` is the bucket's own."""
        await self._bucket()
        return self

    async def put(self, descriptor: SegmentDescriptor) -> None:
        await (await self._bucket()).put(_key(descriptor.name), msgspec.msgpack.encode(descriptor))

    async def get(self, name: str) -> SegmentDescriptor | None:
        try:
            entry = await (await self._bucket()).get(_key(name))
        except KeyNotFoundError:
            return None
        if entry is None or not entry.value:
            return None
        return msgspec.msgpack.decode(entry.value, type=SegmentDescriptor)

    async def delete(self, name: str) -> None:
        try:
            await (await self._bucket()).delete(_key(name))
        except KeyNotFoundError:
            pass


class MemoryMetadataStore:
    """Descriptors in this process's memory: for single-process use and pure tests."""

    def __init__(self) -> None:
        self._descriptors: dict[str, SegmentDescriptor] = {}

    async def put(self, descriptor: SegmentDescriptor) -> None:
        self._descriptors[_key(descriptor.name)] = descriptor

    async def get(self, name: str) -> SegmentDescriptor | None:
        return self._descriptors.get(name)

    async def delete(self, name: str) -> None:
        self._descriptors.pop(name, None)
