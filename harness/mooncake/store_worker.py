"""The Mooncake Store client of a run, inside its worker process: set up, put and get rounds, timed."""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time
import uuid
from pathlib import Path

from harness.mooncake.store_results import check_status, make_result
from harness.mooncake.store_spec import API_CALLS, MooncakeStoreBenchError, chunks, make_keys, segment_sizes

class _Buffers:
    """Source and destination memory for the buffer API: anonymous mmaps, registered with the store."""

    def __init__(self, store, size: int):
        import ctypes
        import mmap

        self.store = store
        self.size = size
        self.src = mmap.mmap(-1, size)
        self.dst = mmap.mmap(-1, size)
        self.src_ptr = ctypes.addressof(ctypes.c_char.from_buffer(self.src))
        self.dst_ptr = ctypes.addressof(ctypes.c_char.from_buffer(self.dst))
        for ptr in (self.src_ptr, self.dst_ptr):
            rc = store.register_buffer(ptr, size)
            if rc != 0:
                raise MooncakeStoreBenchError(f"register_buffer({size}) returned {rc}")

    def unregister(self) -> None:
        for ptr in (self.src_ptr, self.dst_ptr):
            try:
                self.store.unregister_buffer(ptr)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass


def _worker(spec: dict) -> list[dict]:
    from mooncake.store import MooncakeDistributedStore

    block_size = spec["block_size"]
    num_blocks = spec["num_blocks"]
    batch = spec["batch"]
    bsize = spec["batch_size"]
    duration_s = spec["duration_s"]
    api = spec["api"]
    segment, local = segment_sizes(block_size, num_blocks, bsize, api)

    store = MooncakeDistributedStore()
    rc = store.setup(
        "127.0.0.1", spec["metadata_server"], segment, local, "tcp", "", spec["master_addr"]
    )
    if rc != 0:
        raise MooncakeStoreBenchError(f"MooncakeDistributedStore.setup returned {rc}")

    # Distinct payloads per block (cheap to build: a 4 KiB random pattern tiled, then a per-block
    # header) so a get that returns the wrong object is caught by the content check.
    pattern = os.urandom(4096)
    base = (pattern * (block_size // 4096 + 1))[:block_size]

    def payload(i: int) -> bytes:
        head = f"{i:016d}".encode()[:block_size]
        return head + base[len(head) :]

    values = [payload(i) for i in range(num_blocks)]
    bufs: _Buffers | None = None
    if api == "buffer":
        bufs = _Buffers(store, block_size * num_blocks)
        for i, v in enumerate(values):
            bufs.src[i * block_size : (i + 1) * block_size] = v
    prefix = f"tsk-{uuid.uuid4().hex[:8]}"
    groups = chunks(list(range(num_blocks)), bsize)
    num_threads = spec.get("threads", 1)
    executor = concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def each_group(call) -> None:
        # The round's batch calls: in order on this thread, or `threads` at once (list() re-raises a failure).
        if executor is None:
            for idx in groups:
                call(idx)
        else:
            list(executor.map(call, groups))

    def put_round(keys: list[str], latencies: list[float] | None) -> None:
        each_group(lambda idx: put_group(keys, idx, latencies))

    def put_group(keys: list[str], idx: list[int], latencies: list[float] | None) -> None:
        ks = [keys[i] for i in idx]
        t0 = time.perf_counter()
        if api == "bytes":
            if batch:
                st = store.put_batch(ks, [values[i] for i in idx])
            else:
                st = store.put(ks[0], values[idx[0]])
        else:
            if batch:
                st = store.batch_put_from(
                    ks, [bufs.src_ptr + i * block_size for i in idx], [block_size] * len(idx)
                )
            else:
                st = store.put_from(ks[0], bufs.src_ptr + idx[0] * block_size, block_size)
        if latencies is not None:
            latencies.append(time.perf_counter() - t0)
        check_status(API_CALLS[(api, batch, "put")], st)

    def get_round(keys: list[str], latencies: list[float], verify: bool) -> None:
        each_group(lambda idx: get_group(keys, idx, latencies, verify))

    def get_group(keys: list[str], idx: list[int], latencies: list[float], verify: bool) -> None:
        ks = [keys[i] for i in idx]
        t0 = time.perf_counter()
        if api == "bytes":
            got = store.get_batch(ks) if batch else [store.get(ks[0])]
            latencies.append(time.perf_counter() - t0)
            sizes = [len(g) for g in got]
        else:
            if batch:
                sizes = store.batch_get_into(
                    ks, [bufs.dst_ptr + i * block_size for i in idx], [block_size] * len(idx)
                )
            else:
                sizes = [store.get_into(ks[0], bufs.dst_ptr + idx[0] * block_size, block_size)]
            latencies.append(time.perf_counter() - t0)
            got = None
        if any(s != block_size for s in sizes):
            raise MooncakeStoreBenchError(
                f"{API_CALLS[(api, batch, 'get')]} returned sizes {sizes[:8]} for {block_size}-byte objects"
            )
        if verify:
            for j, i in enumerate(idx):
                data = got[j] if got is not None else bufs.dst[i * block_size : (i + 1) * block_size]
                if data != values[i]:
                    raise MooncakeStoreBenchError(f"get of {ks[j]} returned wrong content")

    results: list[dict] = []
    live_keys: list[str] | None = None
    round_index = 0
    try:
        for op in spec["ops"]:
            latencies: list[float] = []
            done = 0
            rounds = 0
            if op == "put":
                elapsed = 0.0
                while elapsed < duration_s:
                    if live_keys is not None:
                        check_status("batch_remove", store.batch_remove(live_keys, True))
                    keys = make_keys(prefix, round_index, num_blocks)
                    round_index += 1
                    t0 = time.perf_counter()
                    put_round(keys, latencies)
                    elapsed += time.perf_counter() - t0
                    live_keys = keys
                    done += num_blocks
                    rounds += 1
            else:
                if live_keys is None:
                    live_keys = make_keys(prefix, round_index, num_blocks)
                    round_index += 1
                    put_round(live_keys, None)
                get_round(live_keys, [], verify=True)  # warm-up + full content check, untimed
                t_start = time.perf_counter()
                while time.perf_counter() - t_start < duration_s:
                    get_round(live_keys, latencies, verify=False)
                    done += num_blocks
                    rounds += 1
                elapsed = time.perf_counter() - t_start
            results.append(
                make_result(
                    op, block_size, batch, bsize, done, len(latencies), elapsed, latencies, api,
                    num_blocks=num_blocks, rounds=rounds, duration_s=duration_s, threads=num_threads,
                )
            )
    finally:
        if live_keys is not None:
            try:
                store.batch_remove(live_keys, True)
            except Exception:  # noqa: BLE001
                pass
        if executor is not None:
            executor.shutdown()
        if bufs is not None:
            bufs.unregister()
        store.close()
    return results


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    out = Path(spec["result_file"])
    try:
        results = _worker(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent through the result file
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    out.write_text(json.dumps(results))
    sys.stdout.flush()
    sys.stderr.flush()
    # The store's C++ threads have been seen to linger after close(); skip interpreter teardown.
    os._exit(0)
