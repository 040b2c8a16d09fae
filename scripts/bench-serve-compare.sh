#!/usr/bin/env bash
# Issue 6's side-by-side run: the same trace-derived load and SLOs against tsukimi disaggregated (1 prefill + 1
# decode + the pool), colocated x2 without and with its local prefix cache; `tsukimi bench serve --sweep` on each,
# one after the other on this machine. Writes OUT/<system>.json (one JSON object each) and OUT/<system>/ plots.
#
#   scripts/bench-serve-compare.sh [OUT] [extra bench serve args...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/bench-serve}; shift || true
TSUKIMI=${TSUKIMI:-.venv/bin/tsukimi}
TRACE=${TRACE:-../shared/traces/synthetic_trace.jsonl}
SYSTEMS=${SYSTEMS:-"disaggregated colocated colocated-prefix"}
PORT=${PORT:-8097}
mkdir -p "$OUT"
# Server settings shared by every system: the bench's SLOs (for rejection and the TBT-bounded batch) and KV blocks
# as long as the scaled trace's (16 tokens at length scale 1/32).
export TSUKIMI_TTFT_SLO_S=${TSUKIMI_TTFT_SLO_S:-2} TSUKIMI_TBT_SLO_S=${TSUKIMI_TBT_SLO_S:-0.15}
export TSUKIMI_CACHE_BLOCK_TOKENS=${TSUKIMI_CACHE_BLOCK_TOKENS:-16} TSUKIMI_LOG_LEVEL=WARNING
for system in $SYSTEMS; do
  case $system in
    disaggregated) flags=() ;;
    colocated) flags=(--colocated) ;;
    colocated-prefix) flags=(--colocated --colocated-prefix-cache) ;;
    colocated-chunked) flags=(--colocated --chunked-prefill 64) ;;
    *) echo "unknown system $system" >&2; exit 2 ;;
  esac
  "$TSUKIMI" up --model "${MODEL:-demo}" --port "$PORT" --database-url "sqlite:///$OUT/$system-journal.db" "${flags[@]}" \
    > "$OUT/$system-up.log" 2>&1 &
  up=$!
  # NOTE: the API answers before the workers serve; `tsukimi up` says "ready" once they do.
  for _ in $(seq 180); do grep -q "up: ready" "$OUT/$system-up.log" && break; sleep 1; done
  "$TSUKIMI" bench serve --url "http://127.0.0.1:$PORT" --trace "$TRACE" --length-scale 0.03125 --sweep \
    --prompt-salt 7 --plot-dir "$OUT/$system" --json "$@" > "$OUT/$system.json" 2> "$OUT/$system-bench.log" || true
  kill -INT $up; wait $up || true
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'max_rate_at_slo', d.get('max_rate_at_slo'), 'effective_capacity', d.get('effective_capacity'))" "$OUT/$system.json" "$system" || true
done
