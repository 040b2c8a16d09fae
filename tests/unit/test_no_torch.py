"""Gateway, conductor and cachestore never import torch or transformers: their images do not ship them."""

from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT_MODULES = [
    # `tsukimi <service>` imports the launcher (for `up`) before dispatching, in every image.
    "tsukimi.cli",
    "tsukimi.launcher",
    # Model names are resolved (and `tsukimi model list` runs) in every image; only a conversion imports torch.
    "tsukimi.model.resolve",
    "tsukimi.model.cli",
    "tsukimi.gateway.service",
    "tsukimi.gateway.app",
    "tsukimi.conductor.service",
    "tsukimi.cachestore.service",
]

# Blocked: `import torch` raises ImportError, as in an image without the worker extra.
BLOCKED = """
import importlib, sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
importlib.import_module({module!r})
assert sys.modules.get("torch") is None, "torch was replaced by a real module"
assert sys.modules.get("transformers") is None, "transformers was replaced by a real module"
"""

# Installed but must stay unimported: catches `try: import torch` too.
UNTOUCHED = """
import importlib, sys
importlib.import_module({module!r})
heavy = sorted(name for name in ("torch", "transformers") if name in sys.modules)
assert not heavy, f"imported {{heavy}}"
"""


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_imports_without_torch(module: str) -> None:
    result = _run(BLOCKED.format(module=module))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_does_not_import_torch(module: str) -> None:
    result = _run(UNTOUCHED.format(module=module))
    assert result.returncode == 0, result.stderr
