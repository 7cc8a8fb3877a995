"""The dependency rules of ARCHITECTURE.md, checked on the real import graph."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "openrl"
WORKERS = ("trainer", "sampler", "rewarder", "gateway")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["bus", *WORKERS])
def test_packages_import_only_what_they_may(package):
    for path in (ROOT / package).rglob("*.py"):
        for name in _imports(path):
            if not name.startswith("openrl"):
                continue
            if package == "bus":
                assert name.startswith("openrl.bus"), f"{path}: bus imports {name}"
            for other in WORKERS:
                if other != package:
                    assert not name.startswith(f"openrl.{other}"), f"{path}: {package} imports {name}"


@pytest.mark.parametrize(
    "module",
    [
        "openrl.bus.client", "openrl.bus.server", "openrl.gateway.app", "openrl.gateway.scoring", "openrl.cli", "openrl.client",
        "openrl.rewarder", "openrl.rewarder.service", "openrl.rewarder.pool", "openrl.rewarder.child", "openrl.rewarder.builtin",
    ],
)  # fmt: skip
def test_light_processes_never_load_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'transformers', 'peft', 'vllm') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"{module} loads {out.stdout.strip()} {out.stderr[-2000:]}"


def test_the_scoring_client_needs_only_the_bus_errors():
    """openrl.client runs on a laptop next to the tinker SDK: no worker package, no nats."""
    names = {n for n in _imports(ROOT / "client.py") if n.startswith("openrl")}
    assert names <= {"openrl.bus.errors"}, names
    code = "import sys, openrl.client; bad = [m for m in ('nats', 'torch', 'aiohttp', 'structlog') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"openrl.client loads {out.stdout.strip()} {out.stderr[-2000:]}"
