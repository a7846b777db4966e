"""Every package the library imports at run time is declared, in pyproject.toml (what
`pip install .` takes) and in requirements.txt (the pinned set CI tests), so that a
runtime-only install never fails late. `.ci/run` also runs a tiny job in such an install
(`scripts/check_runtime.sh`)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

from conftest import ROOT

# Imported by a dependency at run time without it declaring them.
UNDECLARED_BY_DEPENDENCIES = {
    "flatbuffers": "jax.export serialises forward.jax with it",
    "importlib-resources": "tensorflow-datasets 4.9.10 reads its resources with it",
}
# Imported only by features behind an extra (or a one-line error naming the package).
OPTIONAL = {"tensorflow": "imagenet", "torch": "pth"}
RUNTIME = ("amap_jax", "train.py", os.path.join("scripts", "run_exported.py"))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;#]", line.strip(), maxsplit=1)[0])


def _imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in the runtime code, by file."""
    found: dict[str, set[str]] = {}
    files = []
    for item in RUNTIME:
        path = os.path.join(ROOT, item)
        if os.path.isdir(path):
            files += [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if
                      f.endswith(".py")]  # fmt: skip
        else:
            files.append(path)
    for path in files:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "amap_jax":
                    found.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    return found


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_every_runtime_import_is_declared():
    project = _pyproject()
    declared = {_requirement_name(d) for d in project["dependencies"]}
    extras = {
        extra: {_requirement_name(d) for d in deps}
        for extra, deps in project["optional-dependencies"].items()
    }
    distributions = importlib.metadata.packages_distributions()
    imports = _imports()
    assert {"jax", "flax", "optax", "orbax", "PIL", "etils"} <= set(imports)
    for module, files in sorted(imports.items()):
        names = {_norm(d) for d in distributions.get(module, [module])}
        if module in OPTIONAL:
            assert names & extras[OPTIONAL[module]], (module, OPTIONAL[module])
            continue
        assert names & declared, f"{module} (imported by {sorted(files)}) is not declared"
    for name in UNDECLARED_BY_DEPENDENCIES:
        assert name in declared, name


def test_requirements_pin_what_pyproject_declares():
    pinned = set()
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith(("#", "-")):
                pinned.add(_requirement_name(line))
    declared = {_requirement_name(d) for d in _pyproject()["dependencies"]}
    assert pinned == declared


def test_timm_imports_in_this_environment():
    """The index's torchvision is a CUDA build; scripts/setup.sh installs the start-up hook
    (bench/torchvision_cpu.py) that lets a plain `import timm` work in .venv."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", "import timm, torchvision.ops; print(timm.__version__)"],
        capture_output=True,
        text=True,
        cwd="/",  # not the checkout: the hook, not the working tree, must do it
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
