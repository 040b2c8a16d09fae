"""What one Mooncake Store run is: its ops, APIs and the calls they use, its sizes and keys, its errors."""

from __future__ import annotations

from typing import Sequence

SYSTEM = "mooncake-store"
OPS = ("put", "get")
APIS = ("bytes", "buffer")
METADATA_MODES = ("http", "p2p")
MEMCPY_MODES = ("auto", "on", "off")
DEFAULT_BATCH_SIZE = 32
MiB = 1 << 20

# Which MooncakeDistributedStore methods each (api, batch, op) uses.
API_CALLS: dict[tuple[str, bool, str], str] = {
    ("bytes", False, "put"): "put",
    ("bytes", False, "get"): "get",
    ("bytes", True, "put"): "put_batch",
    ("bytes", True, "get"): "get_batch",
    ("buffer", False, "put"): "put_from",
    ("buffer", False, "get"): "get_into",
    ("buffer", True, "put"): "batch_put_from",
    ("buffer", True, "get"): "batch_get_into",
}


class MooncakeStoreUnavailable(RuntimeError):
    """The Mooncake wheel, its master binary, its store module or its shared libraries are missing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MooncakeStoreBenchError(RuntimeError):
    """Mooncake Store is installed but the run failed (master down, setup/put/get error, timeout)."""


def metadata_server_url(mode: str, host: str = "127.0.0.1", http_port: int | None = None) -> str:
    """The client's `metadata_server` argument: the master's HTTP metadata URL, or P2PHANDSHAKE."""
    if mode == "p2p":
        return "P2PHANDSHAKE"
    if mode == "http":
        if not http_port:
            raise ValueError("http metadata needs the master's http_metadata_server_port")
        return f"http://{host}:{http_port}/metadata"
    raise ValueError(f"metadata mode must be one of {METADATA_MODES}, not {mode!r}")


def memcpy_env(mode: str) -> dict[str, str]:
    """Environment for the worker: MC_STORE_MEMCPY=1/0, or nothing for the client's auto-detection."""
    if mode == "auto":
        return {}
    if mode == "on":
        return {"MC_STORE_MEMCPY": "1"}
    if mode == "off":
        return {"MC_STORE_MEMCPY": "0"}
    raise ValueError(f"memcpy mode must be one of {MEMCPY_MODES}, not {mode!r}")


def effective_batch_size(batch: bool, batch_size: int | None, num_blocks: int) -> int:
    """Keys per call: 1 without batching, else batch_size (default 32) capped at num_blocks."""
    if not batch:
        return 1
    size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if size <= 0:
        raise ValueError("batch_size must be positive")
    return max(1, min(size, num_blocks))


def segment_sizes(block_size: int, num_blocks: int, batch_size: int, api: str) -> tuple[int, int]:
    """(global_segment_size, local_buffer_size) for one client holding one round of objects.

    The segment holds num_blocks objects with 2x headroom (allocator alignment, and the master
    evicts past 90% use) plus 64 MiB, rounded up to 1 MiB. The bytes API stages every value of a
    call in the client's local buffer, so it gets 2 calls' worth plus 64 MiB; the buffer API reads
    and writes user-registered memory and only needs a small one."""
    payload = block_size * num_blocks
    segment = _round_up(2 * payload + 64 * MiB, MiB)
    if api == "bytes":
        local = _round_up(2 * block_size * batch_size + 64 * MiB, MiB)
    else:
        local = 64 * MiB
    return segment, local


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def make_keys(prefix: str, round_index: int, num_blocks: int) -> list[str]:
    """Distinct keys of one put round."""
    return [f"{prefix}/r{round_index}/b{i}" for i in range(num_blocks)]


def chunks(items: Sequence, size: int) -> list[Sequence]:
    """`items` cut into consecutive slices of at most `size`."""
    if size <= 0:
        raise ValueError("chunk size must be positive")
    return [items[i : i + size] for i in range(0, len(items), size)]
