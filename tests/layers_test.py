"""The import graph of amap_jax: each module imports only from its own layer or the ones below,
and no two modules import each other, directly or around a circle. A new module must be given
a layer here: that is the point."""

from __future__ import annotations

import ast
import os

from conftest import ROOT

# Lowest first. A module belongs to the most specific prefix listed.
LAYERS = (
    ("amap_jax.logs", "amap_jax.xla_cpu", "amap_jax.timing", "amap_jax.io.paths",
     "amap_jax.io.hosts", "amap_jax.io.trees", "amap_jax.io.images"),
    ("amap_jax.models",),
    ("amap_jax.data", "amap_jax.pruning"),
    ("amap_jax.export_speed", "amap_jax.latency"),  # timed on the backend a run is on
    ("amap_jax.io",),
    ("amap_jax.train",),
    ("amap_jax.methods",),
    ("amap_jax.config", "amap_jax.workdir"),
    ("amap_jax.pipeline", "amap_jax.cli", "amap_jax.predict", "amap_jax"),
)  # fmt: skip


def _layer(module: str) -> int:
    best = (-1, None)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), i)
    assert best[1] is not None, f"{module} has no layer in LAYERS"
    return best[1]


def _is_module(name: str) -> bool:
    path = os.path.join(ROOT, *name.split("."))
    return os.path.isdir(path) or os.path.exists(path + ".py")


def _graph() -> dict[str, set[str]]:
    graph = {}
    for where, _, files in os.walk(os.path.join(ROOT, "amap_jax")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(where, f)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            name = rel.removesuffix(".__init__")
            deps = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if node.module.split(".")[0] != "amap_jax":
                        continue
                    for alias in node.names:  # a submodule, or a name of the module
                        sub = f"{node.module}.{alias.name}"
                        deps.add(sub if _is_module(sub) else node.module)
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.split(".")[0] == "amap_jax"}
            graph[name] = deps - {name}
    return graph


def test_modules_import_only_downward():
    graph = _graph()
    upward = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if not m.startswith(d + ".") and _layer(d) > _layer(m)  # a package's own __init__: fine
    ]
    assert not upward, upward


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ imports its submodules; a submodule importing a sibling through the
    # package is no cycle of code, so edges to a module's own packages are left out.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError(" -> ".join([*path[path.index(d) :], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_pruning_times_nothing():
    """Pruning is surgery and budgets: what a backend runs fastest is measured above it
    (`export_speed`, `latency`), so pruning stays deterministic and cheap to test."""
    timers = {"amap_jax.timing", "amap_jax.xla_cpu"}
    timed = {
        m: deps & timers
        for m, deps in _graph().items()
        if m.startswith("amap_jax.pruning") and deps & timers
    }
    assert not timed, timed
