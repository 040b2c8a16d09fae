#!/usr/bin/env bash
# Round trips of 100 bytes over loopback between two blocking C processes: the host's floor under any
# request/response protocol (see scripts/loopback-pingpong.c). Needs gcc. `python -m tsukimi.bench.session_rtt`
# measures an asyncio echo, the gRPC stream and the session lane beside it.
#
#   scripts/bench-loopback-rtt.sh [ROUND_TRIPS]     # default 20000
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
gcc -O2 -o "$out/loopback-pingpong" loopback-pingpong.c
"$out/loopback-pingpong" "${1:-20000}"
