"""Block checksum speeds: XXH3-64 (what tsukimi records) and zlib's CRC-32 (what earlier versions recorded), over
one buffer of random bytes, best of `--rounds`.

    python -m tsukimi.bench.checksum [--bytes 8388608] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import xxhash


def measure(num_bytes: int, rounds: int) -> dict[str, float]:
    """GB/s of each checksum, best of `rounds` passes of 10 calls."""
    data = os.urandom(num_bytes)
    result = {}
    for name, checksum in (("xxh3_64", xxhash.xxh3_64_intdigest), ("crc32", zlib.crc32)):
        best = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(10):
                checksum(data)
            best = max(best, 10 * num_bytes / (time.perf_counter() - started) / 1e9)
        result[name] = round(best, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsukimi.bench.checksum", description=__doc__.split("\n")[0])
    parser.add_argument("--bytes", type=int, default=8 << 20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.bytes, args.rounds)
    print(json.dumps({"bytes": args.bytes, "gb_per_s": result}) if args.json else
          "  ".join(f"{name} {gbps:.2f} GB/s" for name, gbps in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
