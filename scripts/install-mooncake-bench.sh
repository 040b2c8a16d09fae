#!/usr/bin/env bash
# Install the optional dependency of the harnesses in harness/mooncake/: Mooncake's Transfer Engine wheel
# (which ships the `transfer_engine_bench` binary) and the Debian shared libraries it loads.
#
#   PYTHON=/work/venv/bin/python scripts/install-mooncake-bench.sh
#
# Idempotent: packages already present are not reinstalled. Needs root for apt-get (or sudo).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
DEB_PKGS=(libibverbs1 librdmacm1 libnuma1)
WHEEL="mooncake-transfer-engine-non-cuda"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install-mooncake-bench: not root and no sudo; cannot apt-get install ${DEB_PKGS[*]}" >&2
        exit 1
    fi
fi

missing=()
for p in "${DEB_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-mooncake-bench: apt-get installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "install-mooncake-bench: Debian packages present: ${DEB_PKGS[*]}"
fi

if "$PYTHON" -m pip show "$WHEEL" >/dev/null 2>&1; then
    echo "install-mooncake-bench: $WHEEL already installed in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
else
    echo "install-mooncake-bench: pip installing $WHEEL"
    "$PYTHON" -m pip install --quiet "$WHEEL"
fi

# Smoke check: the bench binary is present and its shared libraries resolve.
"$PYTHON" - <<'PY'
import importlib.util, os, subprocess, sys
spec = importlib.util.find_spec("mooncake")
roots = list(spec.submodule_search_locations or []) if spec else []
paths = [os.path.join(r, "transfer_engine_bench") for r in roots]
path = next((p for p in paths if os.path.isfile(p)), None)
if path is None:
    sys.exit(f"install-mooncake-bench: transfer_engine_bench not found in {roots} after install")
out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
bad = [l.strip() for l in out.splitlines() if "not found" in l]
if bad:
    sys.exit("install-mooncake-bench: unresolved libraries: " + "; ".join(bad))
print(f"install-mooncake-bench: ok: {path}")
PY
