"""Imports point one way: kernels <- model <- workers; cache sits beside model; cluster never imports model,
kernels, workers or torch (the coordinator and server stay light), and workers never import cluster: what both
exchange (config, requests, plans, results, model info, expert placement) lives in wire, a leaf that imports
only the standard library. `cluster/cli.py` is the composition root (it starts the engine: workers, then the
coordinator) and may import the rest inside its functions only."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "model", "cache", "workers", "cluster", "protos", "wire")
ALLOWED = {
    "kernels": {"kernels"},
    "model": {"kernels", "model"},
    "cache": {"kernels", "model", "cache"},
    "workers": {"kernels", "model", "cache", "workers", "wire"},
    "cluster": {"cluster", "protos", "cache", "wire"},
    "protos": {"protos"},
    "wire": {"wire"},
}
# pure-Python modules the coordinator imports: no torch, no model code
NO_TORCH = {"cache/allocator.py", "cache/manager.py", "cache/__init__.py"}


def imports(path: Path, top_level_only: bool) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


@pytest.mark.parametrize("package, path", list(modules()), ids=lambda v: str(v).rsplit("/", 2)[-1])
def test_imports_point_one_way(package, path):
    rel = str(path.relative_to(ROOT))
    composition_root = rel == "cluster/cli.py"
    for name in imports(path, top_level_only=composition_root):
        if name.startswith("dsv4."):
            target = name.split(".")[1]
            assert target in ALLOWED[package], f"{rel} imports {name}"
        if package in ("cluster", "wire") or rel in NO_TORCH:
            assert name.split(".")[0] not in ("torch", "triton"), f"{rel} imports {name}"
        if package == "wire":   # a leaf both sides load: not even numpy
            assert name.split(".")[0] in sys.stdlib_module_names | {"dsv4"}, f"{rel} imports {name}"
