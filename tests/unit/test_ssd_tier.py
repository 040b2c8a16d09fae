"""The cachestore's SSD tier on SQLite and PostgreSQL: round trips, restart recovery, corruption, capacity."""

import hashlib
import os
import random
import uuid

import numpy as np
import pytest
import sqlalchemy

from tsukimi.cachestore.ssd_tier import SsdBlock, SsdError, SsdTier, ssd_blocks_table
from tsukimi.kvpool.checksum import block_checksum

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_or_skip() -> str:
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """(url, new_owner): new_owner() gives a fresh owner name whose rows are deleted at teardown."""
    url = f"sqlite:///{tmp_path}/index.db" if request.param == "sqlite" else _postgres_or_skip()
    owners: list[str] = []

    def new_owner() -> str:
        owners.append(f"test-{uuid.uuid4().hex}")
        return owners[-1]

    yield url, new_owner
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.delete(ssd_blocks_table).where(ssd_blocks_table.c.owner.in_(owners)))
    engine.dispose()


@pytest.fixture
def open_tier(database, tmp_path):
    """open_tier(capacity, owner, directory): a tier closed at teardown; same owner and dir by default."""
    url, new_owner = database
    default_owner = new_owner()
    tiers: list[SsdTier] = []

    def open_tier(capacity: int = 16 << 20, owner: str | None = None, directory=None) -> SsdTier:
        tiers.append(SsdTier(str(directory or tmp_path / "blocks"), url, owner or default_owner, capacity))
        return tiers[-1]

    open_tier.new_owner = new_owner
    yield open_tier
    for tier in tiers:
        tier.close()


def _block(name: str, size: int, seed: int = 0) -> tuple[SsdBlock, bytes]:
    data = random.Random(f"{name}/{seed}").randbytes(size)
    return SsdBlock(hashlib.sha256(name.encode()).digest(), size, block_checksum(data)), data


def _read(tier: SsdTier, key: bytes, size: int) -> bytes:
    out = bytearray(b"\xee" * (size + 16))
    block = tier.read_into(key, memoryview(out))
    assert block.size == size
    assert out[size:] == b"\xee" * 16
    return bytes(out[:size])


def _sorted(blocks) -> list[SsdBlock]:
    return sorted(blocks, key=lambda block: block.key)


def _block_path(tmp_path, key: bytes):
    return tmp_path / "blocks" / key.hex()[:2] / key.hex()


def _files(directory) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("size", [1, 4096, 3 * 1024 * 1024 + 7])
@pytest.mark.parametrize("wrap", [bytes, memoryview, lambda d: np.frombuffer(d, dtype=np.uint8)])
def test_round_trip_is_byte_exact(open_tier, size, wrap):
    tier = open_tier()
    block, data = _block("a", size)
    tier.write(block, wrap(data))
    assert block.key in tier and tier.num_blocks == 1 and tier.used_bytes == size
    assert _read(tier, block.key, size) == data
    with pytest.raises(ValueError):
        tier.write(_block("b", size + 1)[0], data)
    assert tier.num_blocks == 1 and tier.used_bytes == size


def test_restart_recovers_every_block(open_tier):
    tier = open_tier()
    written = [_block(f"r{i}", size) for i, size in enumerate([100, 8192, 70_000])]
    for block, data in written:
        tier.write(block, data)
    tier.close()
    reopened = open_tier()
    assert _sorted(reopened.recover()) == _sorted(b for b, _ in written)
    assert reopened.num_blocks == 3 and reopened.used_bytes == 100 + 8192 + 70_000
    for block, data in written:
        assert _read(reopened, block.key, block.size) == data


def test_recover_drops_rows_without_an_intact_file(open_tier, tmp_path):
    tier = open_tier()
    written = [_block("k", 500), _block("m", 600), _block("s", 700)]
    for block, data in written:
        tier.write(block, data)
    kept, missing, short = (block for block, _ in written)
    tier.close()
    _block_path(tmp_path, missing.key).unlink()
    os.truncate(_block_path(tmp_path, short.key), 699)
    assert open_tier().recover() == [kept]
    again = open_tier()
    assert again.num_blocks == 1 and again.used_bytes == 500 and missing.key not in again
    with pytest.raises(SsdError, match="unknown"):
        _read(again, missing.key, 600)
    assert _files(tmp_path / "blocks") == [f"{kept.key.hex()[:2]}/{kept.key.hex()}"]


def test_recover_deletes_orphan_and_temp_files(open_tier, tmp_path):
    tier = open_tier()
    block, data = _block("o", 300)
    tier.write(block, data)
    tier.close()
    orphan = _block_path(tmp_path, _block("orphan", 1)[0].key)
    temp = _block_path(tmp_path, block.key).with_name(f"{block.key.hex()}.{uuid.uuid4().hex}.tmp")
    for path in (orphan, temp):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    (tmp_path / "blocks" / "notes.txt").write_bytes(b"not ours")
    reopened = open_tier()
    assert reopened.recover() == [block]
    assert not orphan.exists() and not temp.exists()
    assert (tmp_path / "blocks" / "notes.txt").read_bytes() == b"not ours"
    assert _read(reopened, block.key, 300) == data


def test_corrupted_block_raises_and_is_deleted(open_tier, tmp_path):
    tier = open_tier()
    block, data = _block("c", 4096)
    tier.write(block, data)
    path = _block_path(tmp_path, block.key)
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0xFF
    path.write_bytes(raw)
    with pytest.raises(SsdError, match="checksum"):
        _read(tier, block.key, 4096)
    assert block.key not in tier and tier.num_blocks == 0 and tier.used_bytes == 0 and not path.exists()
    with pytest.raises(SsdError, match="unknown"):
        _read(tier, block.key, 4096)
    tier.close()
    assert open_tier().recover() == []


def test_capacity_is_enforced_with_exact_accounting(open_tier, tmp_path):
    tier = open_tier(capacity=10_000)
    (first, first_data), (second, second_data) = _block("x", 6000), _block("y", 4000)
    tier.write(first, first_data)
    with pytest.raises(SsdError, match="no room"):
        tier.write(*_block("z", 4001))
    assert tier.used_bytes == 6000 and tier.num_blocks == 1
    tier.write(second, second_data)
    assert tier.used_bytes == 10_000
    with pytest.raises(SsdError, match="no room"):
        tier.write(*_block("x", 6001, seed=1))
    bigger, bigger_data = _block("x", 5000, seed=2)
    tier.write(bigger, bigger_data)
    assert tier.used_bytes == 9000 and tier.num_blocks == 2
    assert _read(tier, first.key, 5000) == bigger_data
    assert len(_files(tmp_path / "blocks")) == 2


def test_delete_is_idempotent_and_frees_space(open_tier, tmp_path):
    tier = open_tier()
    (gone, gone_data), (kept, kept_data) = _block("d", 1000), _block("e", 2000)
    tier.write(gone, gone_data)
    tier.write(kept, kept_data)
    assert tier.delete(gone.key) is True
    assert tier.used_bytes == 2000 and tier.num_blocks == 1 and gone.key not in tier
    assert not _block_path(tmp_path, gone.key).exists()
    assert tier.delete(gone.key) is False
    assert tier.used_bytes == 2000
    tier.close()
    assert open_tier().recover() == [kept]


def test_owners_sharing_a_database_are_isolated(open_tier, tmp_path):
    ours, theirs = open_tier(), open_tier(owner=open_tier.new_owner(), directory=tmp_path / "other")
    (shared, our_data), (their_shared, their_data) = _block("s", 800), _block("s", 800, seed=1)
    only_ours, only_ours_data = _block("u", 50)
    ours.write(shared, our_data)
    ours.write(only_ours, only_ours_data)
    theirs.write(their_shared, their_data)
    assert only_ours.key not in theirs and theirs.num_blocks == 1
    ours.close()
    theirs.close()
    ours_again = open_tier()
    theirs_again = open_tier(owner=theirs.owner, directory=tmp_path / "other")
    assert _sorted(ours_again.recover()) == _sorted([shared, only_ours])
    assert theirs_again.recover() == [their_shared] and their_shared.checksum != shared.checksum
    assert _read(ours_again, shared.key, 800) == our_data
    assert _read(theirs_again, shared.key, 800) == their_data


def test_overwrite_replaces_the_block(open_tier):
    tier = open_tier()
    old, old_data = _block("w", 3000)
    new, new_data = _block("w", 1200, seed=1)
    tier.write(old, old_data)
    tier.write(new, new_data)
    assert tier.num_blocks == 1 and tier.used_bytes == 1200
    assert _read(tier, new.key, 1200) == new_data
    tier.close()
    reopened = open_tier()
    assert reopened.recover() == [new]
    assert _read(reopened, new.key, 1200) == new_data
