"""Mooncake beside tsukimi, from the wheel `mooncake-transfer-engine-non-cuda`
(`scripts/install-mooncake-bench.sh` installs it).

From the repository root:

- `python -m harness.mooncake.engine`: Mooncake's `transfer_engine_bench` over TCP on loopback;
- `python -m harness.mooncake.compare`: tsukimi's transfer engine beside it, bare loopback TCP and memcpy;
- `python -m harness.mooncake.store`: Mooncake Store put/get, the baseline of `tsukimi bench cachestore`;
- `python -m harness.mooncake.memcpy`: single-thread memcpy, the ceiling of any in-host copy.
"""
