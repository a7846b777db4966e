"""Pruning methods behind one interface (`base.Method`): pick one by name (`config.method`).

A method is one module here whose class is decorated with `@register`: that is the whole
registration. Every module of this package is imported below, so a new file is enough; its
settings become the config section the class names, checked when the method is built. What
each method prunes and how it decides: README ("Methods and sites") and each module's
docstring.
"""

from __future__ import annotations

import importlib
import pkgutil

from amap_jax.methods.base import REGISTRY, Method, SettingError, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from amap_jax.methods.amap import Amap  # noqa: E402  (the public classes, for convenience)
from amap_jax.methods.vtp import Vtp  # noqa: E402

__all__ = [
    "REGISTRY",
    "Amap",
    "Method",
    "SettingError",
    "Vtp",
    "default_sections",
    "from_config",
    "get",
    "names",
    "register",
    "sections",
]


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise SettingError(f"method must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def from_config(config) -> Method:
    """The method `config.method` names, with the settings of its section."""
    return get(config.method).from_config(config)


def sections() -> dict[str, type[Method]]:
    """Every method's own config section and the class whose fields it holds."""
    return {cls.section: cls for cls in REGISTRY.values()}


def default_sections() -> dict[str, dict]:
    return {name: cls.settings() for name, cls in sections().items()}
