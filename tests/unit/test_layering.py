"""The floors of the house, read off every source file's imports (an AST scan, nothing is imported):

- libs import no service, benchmark or simulator; the `tsukimi` command (`tsukimi.cli`, `tsukimi.launcher`) may,
  inside the function that runs a subcommand;
- no service imports another, but the colocated worker, which composes prefill and decode;
- within a service only its `service.py` touches NATS; the KV pool's client never does;
- `tsukimi.common` (the bus side) imports neither grpc nor the transfer engine nor the generated protos.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "conductor", "prefill", "decode", "cachestore", "colocated")
ABOVE = ("bench", "sim")
# The one service allowed to import others, and which.
COMPOSERS = {"colocated": {"prefill", "decode"}}
# Library modules that run subcommands: they may import services and benchmarks inside functions.
COMMANDS = ("tsukimi.cli", "tsukimi.launcher")


@dataclass(frozen=True)
class Import:
    """One import statement of one module."""

    module: str
    target: str
    line: int
    # Inside a function (runs when called), not at module level.
    is_lazy: bool


def packages() -> dict[str, Path]:
    """Package name -> source folder, from pyproject's setuptools `package-dir`."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in config["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the `tsukimi` package -> its file (the most specific package-dir mapping wins)."""
    found: dict[str, Path] = {}
    for package, folder in sorted(packages().items(), key=lambda item: item[0].count(".")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports_of(module: str, source: str, is_package: bool = False) -> list[Import]:
    """The absolute names `source` (the text of `module`) imports, relative imports resolved."""
    found = []

    def visit(node: ast.AST, is_lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            lazy = is_lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")[: len(module.split(".")) - child.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append(Import(module, base, child.lineno, lazy))
                found.extend(Import(module, f"{base}.{alias.name}", child.lineno, lazy) for alias in child.names)
            visit(child, lazy)

    visit(ast.parse(source), False)
    return found


def _layer(module: str) -> tuple[str, str]:
    """(kind, name): ("service", "decode"), ("above", "bench") or ("lib", "common") for a `tsukimi.*` module."""
    parts = module.split(".")
    if len(parts) < 2:
        return "lib", ""
    if parts[1] in SERVICES:
        return "service", parts[1]
    if parts[1] in ABOVE:
        return "above", parts[1]
    return "lib", parts[1]


def violations(imports: list[Import]) -> list[str]:
    """Every import statement that breaks a floor, as `module:line: why (first name imported)`, once each."""
    broken: dict[tuple[str, int, str], str] = {}
    for imp in imports:
        for why in _broken_by(imp):
            broken.setdefault((imp.module, imp.line, why), f"{imp.module}:{imp.line}: {why} ({imp.target})")
    return list(broken.values())


def _broken_by(imp: Import) -> list[str]:
    """The floors one imported name breaks."""
    kind, name = _layer(imp.module)
    top = imp.target.split(".")[0]
    broken = []
    if top == "nats" and kind == "service" and not imp.module.endswith(".service"):
        broken.append("only a service's service.py touches NATS")
    if top == "nats" and name == "kvpool":
        broken.append("the KV pool client never touches NATS")
    if top == "grpc" and name == "common":
        broken.append("tsukimi.common is the bus side: no grpc")
    if top != "tsukimi":
        return broken
    target_kind, target_name = _layer(imp.target)
    if kind == "lib" and target_kind in ("service", "above") and not (imp.module in COMMANDS and imp.is_lazy):
        broken.append("libs import no service, benchmark or simulator")
    if kind == "service" and target_kind == "service" and target_name not in {name, *COMPOSERS.get(name, ())}:
        broken.append("no service imports another")
    if kind == "service" and target_kind == "above":
        broken.append("services import no benchmark or simulator")
    if name == "common" and target_name in ("transfer", "proto"):
        broken.append(f"tsukimi.common imports no {target_name}")
    return broken


def all_imports() -> list[Import]:
    found = []
    for module, path in modules().items():
        if path.parent.name == "proto":
            continue  # generated
        found.extend(imports_of(module, path.read_text(), path.name == "__init__.py"))
    return found


def test_every_import_keeps_the_floors():
    assert violations(all_imports()) == []


def test_the_scan_sees_the_whole_package():
    names = modules()
    for expected in ("tsukimi.cli", "tsukimi.common.messages", "tsukimi.decode.service", "tsukimi.gateway.stream",
                     "tsukimi.kvpool.pool_client", "tsukimi.colocated", "tsukimi.bench.serve", "tsukimi.sim.serve"):
        assert any(name == expected or name.startswith(expected + ".") for name in names), expected


@pytest.mark.parametrize(("module", "source", "why"), [
    ("tsukimi.common.bus", "from tsukimi.decode.engine import DecodeEngine", "libs import no service"),
    ("tsukimi.model.loader", "import tsukimi.bench.serve", "libs import no service, benchmark"),
    ("tsukimi.cli", "from tsukimi.sim import serve", "libs import no service"),
    ("tsukimi.decode.engine", "from tsukimi.prefill.engine import PrefillJob", "no service imports another"),
    ("tsukimi.decode.service", "from ..prefill import engine", "no service imports another"),
    ("tsukimi.conductor.placement", "import nats", "only a service's service.py touches NATS"),
    ("tsukimi.kvpool.pool_client", "import nats.aio.client", "never touches NATS"),
    ("tsukimi.common.settings", "import grpc", "no grpc"),
    ("tsukimi.common.bus", "from tsukimi.transfer.engine import TransferEngine", "imports no transfer"),
    ("tsukimi.gateway.app", "from tsukimi.bench import serve", "services import no benchmark"),
])
def test_a_broken_floor_is_reported(module, source, why):
    found = violations(imports_of(module, source))
    assert len(found) == 1 and why in found[0], found


@pytest.mark.parametrize(("module", "source"), [
    ("tsukimi.cli", "def main():\n    from tsukimi.sim import serve\n"),
    ("tsukimi.colocated.worker", "from tsukimi.prefill.engine import PrefillEngine"),
    ("tsukimi.decode.service", "import nats"),
    ("tsukimi.common.bus", "import nats"),
    ("tsukimi.sim.serve", "from tsukimi.conductor.placement import Placer"),
    ("tsukimi.cachestore.service", "from tsukimi.kvpool.checksum import checksum"),
])
def test_what_the_floors_allow_passes(module, source):
    assert violations(imports_of(module, source)) == []
