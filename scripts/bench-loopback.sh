#!/usr/bin/env bash
# The host's loopback floors, measured by small C programs (needs gcc):
#   rtt       round trips of 100 bytes between two blocking processes: the floor under any request/response
#             protocol (scripts/loopback-pingpong.c; `python -m tsukimi.bench.session_rtt` measures an asyncio
#             echo, the gRPC stream and the session lane beside it)
#   zerocopy  loopback TCP sent with a copy (send) and without one on the sender (vmsplice+splice, sendfile)
#             (scripts/loopback-zerocopy.c)
#
#   scripts/bench-loopback.sh rtt [ROUND_TRIPS]       # default 20000
#   scripts/bench-loopback.sh zerocopy [MIB_PER_WAY]  # default 4000
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  rtt) program=loopback-pingpong; count=${2:-20000} ;;
  zerocopy) program=loopback-zerocopy; count=${2:-4000} ;;
  *) echo "usage: $0 rtt|zerocopy [COUNT]" >&2; exit 2 ;;
esac
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
gcc -O2 -o "$out/$program" "$program.c"
"$out/$program" "$count"
