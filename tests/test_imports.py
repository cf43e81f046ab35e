"""The import direction of the package (README, "Layout"): data -> augment -> model -> objective ->
trainer; backbone, export and evaluation beside the trainer, the CLI on top."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_files() -> dict[str, Path]:
    out = {}
    for package in ("lsdr_repr", "data_pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


@cache
def direct_imports(name: str) -> frozenset[str]:
    """The package modules `name` imports anywhere in its file (lazy imports included)."""
    files = module_files()
    tree = ast.parse(files[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    # importing a.b.c runs the __init__ of a and a.b first
    found |= {".".join(m.split(".")[:i]) for m in set(found) for i in range(1, m.count(".") + 1)}
    return frozenset(m for m in found if m in files and m != name)


def reachable(name: str) -> set[str]:
    """Every package module `name` (a module, or a package and all of its modules) imports,
    directly or through others."""
    files = module_files()
    todo = [m for m in files if m == name or m.startswith(name + ".")]
    own, seen = set(todo), set()
    while todo:
        for dep in direct_imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen - own


@pytest.mark.parametrize(("module", "forbidden"), [
    ("lsdr_repr.train", ("lsdr_repr.eval", "lsdr_repr.export", "lsdr_repr.cli",
                         "lsdr_repr.demo", "lsdr_repr.backbone")),
    ("lsdr_repr.eval", ("lsdr_repr.train", "lsdr_repr.cli", "lsdr_repr.export")),
    ("lsdr_repr.backbone", ("lsdr_repr.train", "lsdr_repr.eval", "lsdr_repr.export",
                            "lsdr_repr.cli")),
    ("lsdr_repr.export", ("lsdr_repr.train", "lsdr_repr.eval", "lsdr_repr.cli")),
    ("data_pipelines", ("lsdr_repr.cli", "lsdr_repr.train", "lsdr_repr.eval")),
    # tensor modules: plain arguments in (lsdr_repr.builders reads the config), ValueError out
    *[(m, ("lsdr_repr.config", "lsdr_repr.distributed", "lsdr_repr.errors",
           "lsdr_repr.tracking", "lsdr_repr.checkpoint"))
      for m in ("lsdr_repr.objectives", "lsdr_repr.augment", "lsdr_repr.augment_ops",
                "lsdr_repr.models")],
])
def test_imports_point_down(module, forbidden):
    bad = sorted(m for m in reachable(module)
                 if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert bad == [], f"{module} reaches {bad}"
