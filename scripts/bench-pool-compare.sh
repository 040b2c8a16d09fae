#!/usr/bin/env bash
# Issue 4's side-by-side run: Mooncake Store (its master and MooncakeDistributedStore, tcp protocol, buffer API;
# one batch call at a time, and 2 at once from 2 threads) and tsukimi's pool (`tsukimi bench cachestore`: unary
# calls, a session, a session with 2 batches in flight), interleaved round by round on this machine, batches of 32
# blocks. Prints one line per system and round (GB/s). Compare like with like: one at a time with "session", two at
# once ("mooncake-store x2") with "--inflight 2". "session" is the workers' client as configured by default: it
# holds the leases of blocks it read and reads them again with no call to the master ("held": the share of the
# timed gets read so), and puts blocks into slots it reserved ahead, with no put start; "--hold-leases 0
# --reserve-bytes 0" asks the master for every get and put, as Mooncake Store's client does.
#
#   scripts/bench-pool-compare.sh [ROUNDS] [BLOCK_BYTES] [batch|single]   # defaults: 3 rounds, 262144, batch
#
# "single": one block per call, one call at a time, on both (Mooncake: put_from / get_into; tsukimi: a session
# and unary calls).
#
# Needs Mooncake's wheel: PYTHON=.venv/bin/python bash scripts/install-mooncake-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BLOCK=${2:-262144}
SHAPE=${3:-batch}
case "$SHAPE" in
  batch) BATCH=--batch; THREADS="1 2"; MODES=("--unary" "" "--hold-leases 0 --reserve-bytes 0" "--inflight 2") ;;
  single) BATCH=; THREADS=1; MODES=("--unary" "" "--hold-leases 0 --reserve-bytes 0") ;;
  *) echo "usage: $0 [ROUNDS] [BLOCK_BYTES] [batch|single]" >&2; exit 2 ;;
esac
PY=${PYTHON:-.venv/bin/python}
TSUKIMI=${TSUKIMI:-.venv/bin/tsukimi}
summary='import json, sys
print(" ".join("%s %.3f" % (d["op"], d["gb_per_s"]) + (" (held %.2f)" % d["held_share"] if d.get("held_share") else "")
               for d in map(json.loads, sys.stdin) if "gb_per_s" in d))'
for round in $(seq "$ROUNDS"); do
  for threads in $THREADS; do
    echo -n "round $round mooncake-store$([ "$threads" = 1 ] || echo " x$threads"): "
    "$PY" -m harness.mooncake.store --block-size "$BLOCK" --num-blocks 256 $BATCH --api buffer --duration 3 \
      --threads "$threads" --json 2>/dev/null | "$PY" -c "$summary"
  done
  for mode in "${MODES[@]}"; do
    echo -n "round $round tsukimi ${mode:-session}: "
    # shellcheck disable=SC2086
    "$TSUKIMI" bench cachestore $BATCH --block-size "$BLOCK" --duration 3 $mode --json 2>/dev/null | "$PY" -c "$summary"
  done
done
