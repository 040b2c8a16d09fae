"""Chained block keys: equal keys mean equal prefixes. A pure function shared by the conductor, the workers,
the cachestore and the tools.

Block i's key = SHA-256(key of block i-1, extra keys, the block's token ids). The first block chains from a
seed derived from the model identity, so keys of different models never collide; the extra keys (an optional
per-tenant cache salt) keep tenants' caches apart. Only full blocks get keys.

`BlockKey` names such a key (the pool client's, the index view's and the cachestore's keys are these bytes).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

KEY_BYTES = 32

# A block's chained key: KEY_BYTES bytes of SHA-256.
BlockKey = NewType("BlockKey", bytes)


def root_key(model: str, seed: bytes = b"tsukimi-block-keys-v1") -> BlockKey:
    """The chain's starting point for `model`."""
    return BlockKey(hashlib.sha256(seed + b"\0" + model.encode()).digest())


def block_keys(token_ids: Sequence[int], block_size: int, model: str, cache_salt: str = "",
               parent: BlockKey | None = None) -> list[BlockKey]:
    """Keys of the full blocks of `token_ids`, in order (a trailing partial block has none).

    `parent` continues a chain (the key of the block before `token_ids[0]`); by default it starts at
    `root_key(model)`.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    key = parent if parent is not None else root_key(model)
    extra = cache_salt.encode()
    keys: list[BlockKey] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start:start + block_size]
        h = hashlib.sha256(key)
        h.update(struct.pack(">I", len(extra)) + extra)
        h.update(struct.pack(f">{block_size}I", *block))
        key = BlockKey(h.digest())
        keys.append(key)
    return keys
