"""One cachestore instance's SSD tier: block bytes as files in a directory, indexed in SQLite or PostgreSQL.

A block lives at `<directory>/<first key byte as hex>/<key hex>`; its row (owner, key, size, checksum) is the
durable index, mirrored in memory for lookups. Writes go to a temp file next to the final one, are fsynced and
renamed into place before the row is upserted, so a crash leaves either no block or the whole block; `recover`
reconciles rows and files after a restart. Blocking calls: run them off the event loop.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import (BigInteger, Column, Float, LargeBinary, MetaData, String, Table, create_engine,
                        delete, insert, select)

from tsukimi.kvpool.checksum import block_checksum, checksum_matches

metadata = MetaData()

ssd_blocks_table = Table(
    "ssd_blocks",
    metadata,
    # Stable name of the tier: several tiers may share one database.
    Column("owner", String(256), primary_key=True),
    # Chained block key (opaque bytes).
    Column("key", LargeBinary, primary_key=True),
    Column("size", BigInteger, nullable=False),
    # tsukimi.kvpool.checksum.block_checksum of the bytes, as given by the writer (verified by checksum_matches).
    Column("checksum", String(64), nullable=False),
    # Unix time of the write.
    Column("stored_at", Float, nullable=False),
)

_TEMP_SUFFIX = ".tmp"
_HEX_DIGITS = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class SsdBlock:
    key: bytes
    size: int
    checksum: str


class SsdError(Exception):
    """Unknown block, missing or short file, checksum mismatch on read, or no room."""


class SsdTier:
    """Blocks of one owner in `directory` and the `ssd_blocks` table; thread-safe."""

    def __init__(self, directory: str, database_url: str, owner: str, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.directory = directory
        self.owner = owner
        self.capacity_bytes = capacity_bytes
        os.makedirs(directory, exist_ok=True)
        is_sqlite = database_url.startswith("sqlite")
        connect_args = {"check_same_thread": False, "timeout": 30} if is_sqlite else {}
        self.engine = create_engine(database_url, connect_args=connect_args, pool_pre_ping=True)
        metadata.create_all(self.engine)
        self._lock = threading.Lock()
        self._blocks: dict[bytes, SsdBlock] = {}
        self._used_bytes = 0
        self._reserved_bytes = 0
        self._load_rows()

    def _load_rows(self) -> None:
        table = ssd_blocks_table
        query = select(table.c.key, table.c.size, table.c.checksum).where(table.c.owner == self.owner)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        self._blocks = {bytes(key): SsdBlock(bytes(key), int(size), checksum) for key, size, checksum in rows}
        self._used_bytes = sum(block.size for block in self._blocks.values())

    def _path(self, key: bytes) -> str:
        if not key:
            raise ValueError("empty block key")
        name = key.hex()
        return os.path.join(self.directory, name[:2], name)

    def _delete_rows(self, keys: list[bytes]) -> None:
        if not keys:
            return
        table = ssd_blocks_table
        with self.engine.begin() as conn:
            # NOTE: chunked: SQLite caps the number of bound parameters in one statement.
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                conn.execute(delete(table).where(table.c.owner == self.owner, table.c.key.in_(chunk)))

    def recover(self) -> list[SsdBlock]:
        """Reconciles rows and files at start, before any write: keeps the blocks whose file has the recorded
        size, drops the other rows, deletes files without a row (and temp files of interrupted writes).
        Does not read the files: `read_into` verifies checksums."""
        with self._lock:
            self._load_rows()
            lost = []
            for key, block in self._blocks.items():
                try:
                    is_intact = os.stat(self._path(key)).st_size == block.size
                except FileNotFoundError:
                    is_intact = False
                if not is_intact:
                    lost.append(key)
            self._delete_rows(lost)
            for key in lost:
                self._used_bytes -= self._blocks.pop(key).size
            expected = {self._path(key) for key in self._blocks}
            for shard in os.scandir(self.directory):
                # NOTE: only the two-hex-digit shard directories are ours; other files (say an SQLite database
                # kept in the same directory) are left alone.
                if not (shard.is_dir() and len(shard.name) == 2 and set(shard.name) <= _HEX_DIGITS):
                    continue
                for entry in os.scandir(shard.path):
                    if entry.is_file() and entry.path not in expected:
                        os.unlink(entry.path)
            return list(self._blocks.values())

    def write(self, block: SsdBlock, data) -> None:
        """Stores `data` (bytes-like, exactly `block.size` bytes) under `block.key`, replacing any older copy.
        Raises SsdError when it does not fit in `capacity_bytes`."""
        view = memoryview(data).cast("B")
        if view.nbytes != block.size:
            raise ValueError(f"block of {block.size} bytes given {view.nbytes} bytes")
        path = self._path(block.key)
        with self._lock:
            old = self._blocks.get(block.key)
            needed = self._used_bytes + self._reserved_bytes + block.size - (old.size if old else 0)
            if needed > self.capacity_bytes:
                raise SsdError(f"no room for {block.size} bytes: {self._used_bytes} of {self.capacity_bytes} "
                               f"bytes used, {self._reserved_bytes} reserved")
            self._reserved_bytes += block.size
        temp_path = f"{path}.{uuid.uuid4().hex}{_TEMP_SUFFIX}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(temp_path, "wb", buffering=0) as f:
                written = 0
                while written < block.size:
                    written += f.write(view[written:])
                os.fsync(f.fileno())
            with self._lock:
                os.replace(temp_path, path)
                self._upsert(block)
                old = self._blocks.get(block.key)
                self._used_bytes += block.size - (old.size if old else 0)
                self._blocks[block.key] = block
        finally:
            with self._lock:
                self._reserved_bytes -= block.size
            if os.path.exists(temp_path):
                os.unlink(temp_path)

    def _upsert(self, block: SsdBlock) -> None:
        table = ssd_blocks_table
        with self.engine.begin() as conn:
            conn.execute(delete(table).where(table.c.owner == self.owner, table.c.key == block.key))
            conn.execute(insert(table).values(owner=self.owner, key=block.key, size=block.size,
                                              checksum=block.checksum, stored_at=time.time()))

    def read_into(self, key: bytes, out: memoryview) -> SsdBlock:
        """Fills `out[:size]` with the block's bytes and verifies its checksum. Raises SsdError on an unknown
        key, a missing or short file, or a mismatch; a bad copy is deleted so it is not served again."""
        with self._lock:
            block = self._blocks.get(key)
        if block is None:
            raise SsdError(f"unknown block {key.hex()}")
        target = memoryview(out).cast("B")
        if target.nbytes < block.size:
            raise ValueError(f"buffer of {target.nbytes} bytes for a block of {block.size} bytes")
        target = target[:block.size]
        problem = None
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                filled = 0
                while filled < block.size:
                    n = f.readinto(target[filled:])
                    if not n:
                        break
                    filled += n
            if filled < block.size:
                problem = f"short file: {filled} of {block.size} bytes"
            elif not checksum_matches(target, block.checksum):
                problem = f"checksum {block_checksum(target)} != recorded {block.checksum}"
        except FileNotFoundError:
            problem = "missing file"
        if problem is None:
            return block
        with self._lock:
            # NOTE: an overwrite that raced this read changed the block; only the copy we read is bad.
            is_same = self._blocks.get(key) is block
        if is_same:
            self.delete(key)
        raise SsdError(f"block {key.hex()}: {problem}")

    def delete(self, key: bytes) -> bool:
        """Removes the block's row and file; True when it existed."""
        with self._lock:
            block = self._blocks.pop(key, None)
            if block is None:
                return False
            self._used_bytes -= block.size
            self._delete_rows([key])
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass
            return True

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def blocks(self) -> list[SsdBlock]:
        """Every block held now."""
        with self._lock:
            return list(self._blocks.values())

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def close(self) -> None:
        """Disposes the database engine."""
        self.engine.dispose()

