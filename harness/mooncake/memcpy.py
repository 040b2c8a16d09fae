"""Single-thread memcpy bandwidth of this machine, the ceiling for any in-host copy path.

`measure_memcpy()` copies `size_bytes` from one uint8 numpy array into another with
`np.copyto(dst, src)`. Both arrays are pre-faulted (written once) before timing, so the numbers
exclude page faults; each repeat is timed alone and the median is reported. Bandwidth counts the
bytes *copied* once (not read + written), in GB/s of 1e9 bytes/s, the same unit as
`harness.mooncake.engine`.

    python -m harness.mooncake.memcpy --size 1073741824 --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

DEFAULT_SIZE = 1 << 30


def measure_memcpy(size_bytes: int = DEFAULT_SIZE, repeats: int = 5) -> dict:
    """Median single-thread memcpy bandwidth into an existing, pre-faulted buffer."""
    if size_bytes <= 0:
        raise ValueError("size_bytes must be positive")
    if repeats <= 0:
        raise ValueError("repeats must be positive")
    src = np.empty(size_bytes, dtype=np.uint8)
    dst = np.empty(size_bytes, dtype=np.uint8)
    # Pre-fault both buffers: np.empty only reserves address space; the first write maps the pages.
    src.fill(0xA5)
    dst.fill(0)
    np.copyto(dst, src)  # warm-up copy, untimed
    samples: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        samples.append(time.perf_counter() - t0)
    median_s = statistics.median(samples)
    return {
        "system": "memcpy",
        "method": "numpy.copyto uint8, single thread, pre-faulted",
        "size_bytes": size_bytes,
        "repeats": repeats,
        "median_s": median_s,
        "gb_per_s": size_bytes / median_s / 1e9,
        "samples_gb_per_s": [size_bytes / s / 1e9 for s in samples],
        "loadavg_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.mooncake.memcpy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="bytes to copy (default 1 GiB)")
    parser.add_argument("--repeats", type=int, default=5, help="timed copies; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = measure_memcpy(args.size, args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"memcpy {result['size_bytes']} bytes x{result['repeats']}: "
            f"median {result['gb_per_s']:.2f} GB/s (1e9 bytes/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
