"""Memory the engine moves bytes between: POSIX shared memory it creates or maps, and views of user buffers."""

from __future__ import annotations

import mmap
import os
import secrets

SHM_DIR = "/dev/shm"


def as_byte_view(obj) -> memoryview:
    """A flat writable-or-readonly byte view of a bytearray, bytes, mmap, memoryview, numpy array or torch CPU
    tensor (contiguous)."""
    if hasattr(obj, "numpy") and hasattr(obj, "is_contiguous"):  # torch tensor, without importing torch
        if not obj.is_contiguous() or obj.device.type != "cpu":
            raise ValueError("only contiguous CPU tensors can be registered")
        obj = obj.view(-1).view(dtype=__import__("torch").uint8).numpy()
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class SharedRegion:
    """A POSIX shared-memory object mapped into this process.

    The creator owns it (unlinks it on close). Pages are touched at creation so the first transfer does not
    pay page faults: shared memory pays only when kept alive and pre-faulted.
    """

    def __init__(self, name: str, length: int, is_owner: bool, writable: bool):
        self.name = name
        self.length = length
        self.is_owner = is_owner
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR if writable else os.O_RDONLY
        if is_owner:
            flags |= os.O_CREAT | os.O_EXCL
        fd = os.open(path, flags, 0o600)
        try:
            if is_owner:
                os.ftruncate(fd, length)
            elif os.fstat(fd).st_size != length:
                raise ValueError(f"shared memory {name} has {os.fstat(fd).st_size} bytes, expected {length}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mmap = mmap.mmap(fd, length, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(fd)
            if is_owner:
                os.unlink(path)
            raise
        os.close(fd)
        self.view = memoryview(self._mmap)
        if is_owner:
            _prefault(self._mmap, length)

    @classmethod
    def create(cls, length: int, prefix: str = "tsukimi") -> "SharedRegion":
        # NOTE: the name carries the creator's pid so `sweep_orphans` can reclaim it after a crash.
        """A new zero-filled region of `length` bytes, owned by this process."""
        return cls(f"{prefix}-{os.getpid()}-{secrets.token_hex(6)}", length, is_owner=True, writable=True)

    @classmethod
    def attach(cls, name: str, length: int, writable: bool) -> "SharedRegion":
        """Maps a peer's region; raises OSError when it is not on this host (or gone), ValueError on a size
        mismatch."""
        return cls(name, length, is_owner=False, writable=writable)

    def close(self) -> None:
        try:
            self.view.release()
            self._mmap.close()
        except (BufferError, ValueError):
            # NOTE: a live numpy/torch view of the region keeps the map; it is freed with the last view.
            pass
        if self.is_owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass


def _prefault(region: mmap.mmap, length: int) -> None:
    if hasattr(region, "madvise") and hasattr(mmap, "MADV_POPULATE_WRITE"):
        try:
            region.madvise(mmap.MADV_POPULATE_WRITE)
            return
        except OSError:
            pass
    page = mmap.PAGESIZE
    zero = b"\0"
    for offset in range(0, length, page):
        region[offset:offset + 1] = zero


def sweep_orphans(prefix: str = "tsukimi") -> list[str]:
    """Unlinks shared-memory objects left by processes of this host that died without closing them."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != prefix or not parts[1].isdigit():
            continue
        if not pid_alive(int(parts[1])):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
