"""The checksum of a KV block's bytes: what writers record with a block and readers verify (pool, SSD tier)."""

from __future__ import annotations

import zlib


def block_checksum(data) -> str:
    """CRC-32 of a bytes-like object (bytes, memoryview, contiguous numpy array), as 8 hex digits."""
    return f"{zlib.crc32(data):08x}"
