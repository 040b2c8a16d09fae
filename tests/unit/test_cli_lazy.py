"""The `tsukimi` command imports a subcommand's module only when it runs: `--help` and the light subcommands work
where grpc, torch, transformers and nats are not installed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# As in an image without the extras: importing any of these raises ImportError.
BLOCKED = """
import json, sys
for name in ("grpc", "torch", "transformers", "nats"):
    sys.modules[name] = None
from tsukimi.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:
    code = exc.code
loaded = sorted(name for name in sys.modules if name.startswith(("tsukimi.bench", "tsukimi.sim", "tsukimi.launcher",
                                                                 "tsukimi.model.cli")))
print(json.dumps({{"code": code, "loaded": loaded}}), file=sys.stderr)
"""


def _tsukimi(argv: list[str]) -> tuple[int, str, list[str]]:
    """(exit code, stdout, subcommand modules imported) of `tsukimi ARGV` with the extras blocked."""
    result = subprocess.run([sys.executable, "-c", BLOCKED.format(argv=argv)], capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith('{"code"'), result.stderr
    outcome = json.loads(lines[-1])
    return outcome["code"], result.stdout, outcome["loaded"]


def test_help_imports_no_subcommand():
    code, out, loaded = _tsukimi(["--help"])
    assert code == 0
    assert all(name in out for name in ("gateway", "up", "model", "bench", "sim"))
    assert loaded == []


def test_sim_help_lists_the_simulations_without_importing_them():
    code, out, loaded = _tsukimi(["sim", "--help"])
    assert code == 0
    assert "cache" in out and "serve" in out
    assert loaded == []


@pytest.mark.parametrize("argv, module", [
    (["sim", "serve", "--help"], "tsukimi.sim.serve"),
    (["sim", "cache", "--help"], "tsukimi.sim.cache"),
    (["bench", "placement", "--help"], "tsukimi.bench.placement"),
])
def test_a_subcommand_imports_its_own_module_only(argv, module):
    code, out, loaded = _tsukimi(argv)
    assert code == 0 and "usage: tsukimi" in out
    assert module in loaded
    assert not [name for name in loaded if name.startswith(("tsukimi.bench.", "tsukimi.sim."))
                and name.rsplit(".", 1)[0] != module.rsplit(".", 1)[0]]


def test_sim_cache_runs_without_the_extras(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in [{"input_length": 1000, "hash_ids": [1, 2]},
                                                          {"input_length": 1536, "hash_ids": [1, 2, 3]}]))
    code, out, _ = _tsukimi(["sim", "cache", "--trace", str(trace), "--block-tokens", "512", "--json"])
    assert code == 0
    assert json.loads(out)["block_hit_ratio"] == round(2 / 5, 4)
