"""Block copies the way the shm transport makes them: `block_size` pieces of a 64 MiB buffer into another one,
16 bytes misaligned (as a numpy array's data usually sits against a page-aligned shared segment), on 1 or 2
threads; numpy's `copyto` (glibc memmove) beside the engine's `copy_bytes` (streaming stores from 64 KiB up).
Best of `repeats` passes, GB/s of bytes copied.

    python -m tsukimi.bench.block_copy --json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

from tsukimi.transfer.shm_peer import copy_bytes

COPIERS = {"numpy_copyto": lambda dst, src: np.copyto(dst, src), "engine_copy_bytes": copy_bytes}


def measure(copier: str, block_size: int, num_threads: int, total_bytes: int = 64 << 20, repeats: int = 5) -> float:
    """GB/s of copying `total_bytes` in `block_size` pieces, spread over `num_threads` threads."""
    copy = COPIERS[copier]
    src = np.random.default_rng(0).integers(0, 256, total_bytes, dtype=np.uint8)
    dst = np.zeros(total_bytes + 64, dtype=np.uint8)
    num_blocks = total_bytes // block_size

    def work(part: int) -> None:
        for i in range(part, num_blocks, num_threads):
            copy(dst[i * block_size + 16:(i + 1) * block_size + 16], src[i * block_size:(i + 1) * block_size])

    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=work, args=(p,)) for p in range(num_threads)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = min(best, time.perf_counter() - started)
    if not np.array_equal(dst[16:num_blocks * block_size + 16], src[:num_blocks * block_size]):
        raise AssertionError(f"{copier} copied wrong bytes")
    return num_blocks * block_size / best / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsukimi.bench.block_copy")
    parser.add_argument("--block-sizes", default="65536,262144,1048576", help="comma-separated bytes")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--json", action="store_true", help="one JSON object per measurement")
    args = parser.parse_args(argv)
    for block_size in (int(x) for x in args.block_sizes.split(",")):
        for num_threads in (int(x) for x in args.threads.split(",")):
            for copier in COPIERS:
                gb_per_s = round(measure(copier, block_size, num_threads), 2)
                row = {"copier": copier, "block_size": block_size, "threads": num_threads, "gb_per_s": gb_per_s}
                print(json.dumps(row) if args.json else f"{copier:<18} block {block_size >> 10:>5} KiB  "
                      f"threads {num_threads}: {gb_per_s:6.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
