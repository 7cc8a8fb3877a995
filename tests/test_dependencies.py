"""Every third-party package that openrl/ imports is declared in pyproject.toml: in
`dependencies`, or in an extra other than `dev` (which is for the tests) for the optional
parts (vllm, plots, tracking). An import that works only because another package happens
to pull its distribution in breaks the day that package drops it."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Distributions of import names this environment may not have installed (an optional backend).
NOT_INSTALLED = {"vllm": "vllm"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_names(source: str) -> set[str]:
    """The top-level names of every absolute import in `source`, function-local ones included."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports() -> dict[str, set[str]]:
    """Import name -> the files of openrl/ that import it (the standard library and openrl left out)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "openrl").rglob("*.py")):
        for name in imported_names(path.read_text()):
            if name not in sys.stdlib_module_names and name != "openrl":
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def declared() -> dict[str, str]:
    """Normalized distribution name -> where pyproject.toml declares it ("dependencies" or "extra X")."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {_normalize(Requirement(r).name): "dependencies" for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        if extra != "dev":
            for r in reqs:
                out.setdefault(_normalize(Requirement(r).name), f"extra {extra}")
    return out


def test_imported_names_are_read_from_every_kind_of_import():
    source = "import a.b, c\nfrom d.e import f\nfrom . import g\nfrom .h import i\ndef j():\n    import k\ntry:\n    import m\nexcept ImportError:\n    pass\n"
    assert imported_names(source) == {"a", "c", "d", "k", "m"}


def test_every_imported_package_is_declared():
    dists = packages_distributions()
    have = declared()
    missing = []
    for name, files in sorted(third_party_imports().items()):
        candidates = dists.get(name) or ([NOT_INSTALLED[name]] if name in NOT_INSTALLED else [])
        assert candidates, f"{name} (imported by {sorted(files)}) belongs to no installed distribution; add it to NOT_INSTALLED"
        if not any(_normalize(d) in have for d in candidates):
            missing.append(f"{'/'.join(candidates)} (import {name} in {', '.join(sorted(files))})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)
    # The check does see the packages it is about.
    found = third_party_imports()
    assert {"httpx", "safetensors", "huggingface_hub", "prometheus_client", "filelock"} <= set(found)
