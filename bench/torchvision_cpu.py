"""`import torchvision` (and so `import timm`) beside CPU torch.

The only torchvision wheel on this index is a CUDA build: its compiled ops do not load beside CPU
torch, and its import then fails with `operator torchvision::nms does not exist` while it
registers fake kernels for them. Defining the two ops first lets it import; timm never calls them
for classification models.

Standalone (no package imports): scripts/setup.sh copies it into the virtualenv with a `.pth`
line that calls `install()`, so a plain `import timm` works in `.venv`; bench/torch_env.py calls
`import_torchvision()` where the hook is not installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _missing_ops(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "torchvision::" in str(error)


def _define_ops() -> None:
    import torch

    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", _SCHEMA)


def _forget_submodules() -> None:
    for name in [m for m in sys.modules if m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision():
    """Imports torchvision through the hook (installed here when the `.pth` line did not)."""
    install()
    import torchvision

    return torchvision


class _Loader(importlib.abc.Loader):
    """Runs torchvision's own loader; on the missing-ops error defines them and runs it again."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        except RuntimeError as e:
            if not _missing_ops(e):
                raise
            _forget_submodules()
            _define_ops()
            self._loader.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once: the next lookups are the ordinary ones
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Called at interpreter start by the `.pth` line: costs one list insert, imports nothing."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
