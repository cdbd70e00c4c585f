"""The package's layering (DESIGN.md, "Layout"): each subpackage imports alone, in a fresh
interpreter, and pulls in only the layers below it; no two modules import each other (directly
or through others), checked on the source's import statements."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spd_ray"

LEAVES = {"spd_ray", "spd_ray.config", "spd_ray.errors", "spd_ray.io"}
# modules that must never be loaded by importing these (they may be below, not above)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "spd_ray.core": ("spd_ray.train", "spd_ray.evals", "spd_ray.targets", "ray"),
    "spd_ray.evals": ("spd_ray.train", "spd_ray.api", "ray"),
    "spd_ray.targets": ("spd_ray.train", "spd_ray.api", "spd_ray.evals", "ray"),
    "spd_ray.harvest.pipeline": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep"),
    "spd_ray.harvest.store": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep"),
    "spd_ray.autointerp.pipeline": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep"),
    "spd_ray.loaded_run": ("spd_ray.train", "spd_ray.api", "ray"),
    "spd_ray.analysis.batches": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep", "ray"),
    "spd_ray.analysis.compare": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep", "ray"),
    "spd_ray.analysis.activation_plots": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep", "ray"),
    "spd_ray.attributions.compute": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep", "ray"),
    "spd_ray.attributions.store": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep", "ray"),
    "spd_ray.attributions.pipeline": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep"),
    "spd_ray.clustering.merge": ("spd_ray.core", "spd_ray.train", "spd_ray.api", "ray"),
    "spd_ray.clustering.ensemble": ("spd_ray.train", "spd_ray.api", "spd_ray.sweep"),
    "spd_ray.clustering.mapping": ("spd_ray.core", "spd_ray.train", "spd_ray.api", "ray"),
    "spd_ray.runs": ("spd_ray.train", "spd_ray.core", "spd_ray.targets", "ray"),
    "spd_ray.train.loop": ("spd_ray.train.run", "spd_ray.train.ray_driver", "ray"),
    "spd_ray.train.worker": ("spd_ray.train.run", "spd_ray.train.ray_driver", "ray"),
    "spd_ray.train.lifecycle": ("spd_ray.train.run", "spd_ray.train.ray_driver", "ray"),
}


# One interpreter loads the third-party libraries once (none of them loads spd_ray or ray), then
# forks a child per layer that imports that layer alone and reports what of spd_ray and ray it
# loaded: the same answer as a fresh interpreter per layer, without paying torch's import each time.
FORK_PER_LAYER = r"""
import json, os, sys
import numpy, pyarrow, pydantic, torch, transformers  # noqa: F401

def report(module):
    try:
        __import__(module)
        loaded = sorted(m for m in sys.modules
                        if m.startswith("spd_ray") or m == "ray" or m.startswith("ray."))
        return {"loaded": loaded}
    except BaseException as err:
        return {"error": f"{type(err).__name__}: {err}"}

found = {}
for module in sys.argv[1:]:
    assert not any(m.startswith("spd_ray") or m == "ray" for m in sys.modules)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, json.dumps(report(module)).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    found[module] = json.loads(data)
print(json.dumps(found))
"""


def _loaded_alone(modules: list[str]) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", FORK_PER_LAYER, *modules],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for module, result in found.items():
        assert "error" not in result, f"import {module} alone failed: {result['error']}"
    return {m: r["loaded"] for m, r in found.items()}


def _below(name: str, prefixes: tuple[str, ...]) -> list[str]:
    return [p for p in prefixes if name == p or name.startswith(p + ".")]


@pytest.fixture(scope="module")
def loaded_alone() -> dict[str, list[str]]:
    """What importing each layer alone loads (a forked child of one interpreter per layer)."""
    return _loaded_alone([*sorted(FORBIDDEN), "spd_ray.core.losses"])


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_a_layer_imports_alone_without_the_layers_above(
    module: str, loaded_alone: dict[str, list[str]]
) -> None:
    loaded = loaded_alone[module]
    assert module in loaded
    above = sorted(m for m in loaded if _below(m, FORBIDDEN[module]))
    assert not above, f"importing {module} loads {above}"


def test_core_loads_only_core_and_the_config_schema(loaded_alone: dict[str, list[str]]) -> None:
    loaded = [m for m in loaded_alone["spd_ray.core.losses"] if m.startswith("spd_ray")]
    assert "spd_ray.core.pgd" in loaded
    outside = [m for m in loaded if not m.startswith("spd_ray.core") and m not in LEAVES]
    assert not outside, f"core loads {outside}"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> spd_ray modules its source imports (at the top, in functions; not in
    `if TYPE_CHECKING:` blocks, which never run)."""
    graph: dict[str, set[str]] = {}
    root = package.parent
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_init = parts[-1] == "__init__"
        mod = ".".join(parts[:-1] if is_init else parts)
        pkg = mod if is_init else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for n in ast.walk(stmt)
        }
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("spd_ray")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                if not base.startswith("spd_ray"):
                    continue
                subs = [
                    f"{base}.{a.name}"
                    for a in node.names
                    if (root / base.replace(".", "/") / f"{a.name}.py").exists()
                    or (root / base.replace(".", "/") / a.name / "__init__.py").exists()
                ]
                edges |= set(subs)
                if len(subs) < len(node.names):
                    edges.add(base)
        graph[mod] = edges - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "spd_ray"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from spd_ray.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from . import a\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from spd_ray.sub import a\n"
    )
    graph = import_graph(pkg)
    assert graph["spd_ray.sub.b"] == {"spd_ray.sub.a"}
    assert graph["spd_ray.sub.c"] == set()
    assert cycles(graph) == [["spd_ray.sub.a", "spd_ray.sub.b"]]


def test_no_module_imports_itself_through_others() -> None:
    graph = import_graph()
    assert len(graph) > 60
    assert cycles(graph) == []


def test_no_module_of_the_package_imports_the_public_api() -> None:
    """`spd_ray.api` is for users (the package's `__init__` loads it on first use of its names);
    the package's modules import the modules behind it."""
    users = sorted(m for m, edges in import_graph().items() if "spd_ray.api" in edges)
    assert users == ["spd_ray"]
