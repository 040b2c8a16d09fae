#!/usr/bin/env bash
# How much of the prefill -> decode KV transfer hides behind compute: the same prompts through `tsukimi up` with
# layer-wise transfer on and off; prints, per mode, the mean KV transfer time (first write to last one done) and
# the mean part of it left after the forward ended (what the request waits for before decode can start).
#
#   scripts/bench-layerwise.sh [NUM_REQUESTS] [PROMPT_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}; LEN=${2:-2000}
TSUKIMI=${TSUKIMI:-.venv/bin/tsukimi}
PORT=${PORT:-8098}
OUT=$(mktemp -d)
for layerwise in true false; do
  TSUKIMI_KV_LAYERWISE=$layerwise TSUKIMI_IS_CACHE_ENABLED=false "$TSUKIMI" up --model demo --port "$PORT" \
    --database-url "sqlite:///$OUT/j-$layerwise.db" > "$OUT/up-$layerwise.log" 2>&1 &
  up=$!
  for _ in $(seq 180); do grep -q "up: ready" "$OUT/up-$layerwise.log" && break; sleep 1; done
  probe=$(grep -o "prefill INFO .*probe on http://[0-9.:]*" "$OUT/up-$layerwise.log" | grep -o "http://.*" | head -1)
  for i in $(seq "$N"); do
    prompt=$(python3 -c "import random,sys; r=random.Random($i); print([r.randrange(255) for _ in range($LEN)])")
    curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
      -d "{\"model\":\"demo\",\"prompt\":$prompt,\"max_tokens\":2,\"temperature\":0}" > /dev/null
  done
  curl -s "$probe/metrics" | python3 -c "
import sys
m = {l.split()[0]: float(l.split()[1]) for l in sys.stdin if l.startswith('tsukimi_prefill_') and ' ' in l}
n = m['tsukimi_prefill_kv_transfer_seconds_count']
t = m['tsukimi_prefill_kv_transfer_seconds_sum'] / n
e = m['tsukimi_prefill_kv_transfer_exposed_seconds_sum'] / n
f = m['tsukimi_prefill_seconds_sum'] / m['tsukimi_prefill_seconds_count']
print(f'layerwise=$layerwise: {int(n)} requests of $LEN tokens: prefill {f*1000:.1f} ms, KV transfer {t*1000:.2f} ms, '
      f'exposed after the forward {e*1000:.2f} ms ({max(0.0, 1 - e / t) * 100 if t else 0:.0f}% hidden)')"
  kill -INT $up; wait $up || true
done
rm -rf "$OUT"
