#!/usr/bin/env bash
# Loopback TCP sent with a copy (send) and without one on the sender (vmsplice+splice, sendfile), two rounds each:
# see scripts/loopback-zerocopy.c. Needs gcc.
#
#   scripts/bench-loopback-zerocopy.sh [MIB_PER_WAY]     # default 4000
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
gcc -O2 -o "$out/loopback-zerocopy" loopback-zerocopy.c
"$out/loopback-zerocopy" "${1:-4000}"
