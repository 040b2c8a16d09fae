"""Chained block keys: exact expectations."""

import hashlib
import struct

import pytest

from tsukimi.kvpool.block_keys import block_keys, root_key


def test_only_full_blocks_and_exact_chain():
    tokens = list(range(10))
    keys = block_keys(tokens, 4, "demo")
    assert len(keys) == 2  # tokens 8 and 9 form a partial block: no key
    expected = root_key("demo")
    for block in ([0, 1, 2, 3], [4, 5, 6, 7]):
        expected = hashlib.sha256(expected + struct.pack(">I", 0) + struct.pack(">4I", *block)).digest()
    assert keys[1] == expected
    assert block_keys(tokens[:3], 4, "demo") == []


def test_equal_keys_mean_equal_prefixes():
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, "demo")
    b = block_keys([1, 2, 3, 4, 5, 6, 7, 9], 4, "demo")
    c = block_keys([9, 2, 3, 4, 5, 6, 7, 8], 4, "demo")
    assert a[0] == b[0] and a[1] != b[1]
    assert c[1] != a[1]  # same second block, different first: a different prefix


def test_model_salt_and_continuation():
    tokens = list(range(8))
    assert block_keys(tokens, 4, "demo") != block_keys(tokens, 4, "other-model")
    assert block_keys(tokens, 4, "demo") != block_keys(tokens, 4, "demo", cache_salt="tenant-a")
    whole = block_keys(tokens, 4, "demo")
    assert block_keys(tokens[4:], 4, "demo", parent=whole[0]) == whole[1:]
    with pytest.raises(ValueError):
        block_keys(tokens, 0, "demo")
