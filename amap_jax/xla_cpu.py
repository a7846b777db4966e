"""Which library kernels XLA:CPU compiles a forward pass to: named sets of compiler options.

This jaxlib hands CPU matrix products and reductions to YNNPACK. Which set runs a model fastest
depends on the model: at ViT-S shapes YNNPACK's products were slower than XLA's own and its
reductions (softmax's row max and sum) faster, on a small FLatten ViT the reverse held for the
reductions (`bench/studies/xla_flags.py`). So the set is measured per model
(`export_speed.fastest_kernels`), and given to one compiled function, not to the process
(`XLA_FLAGS` would change every other computation too).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

_OPTION = "xla_cpu_experimental_ynn_fusion_type"
SETS = {
    "default": {},  # what this jaxlib does unless told otherwise
    "ynn_reduce": {_OPTION: "LIBRARY_FUSION_TYPE_REDUCE"},  # YNNPACK reductions, XLA products
    "xla": {_OPTION: ""},  # XLA's own kernels for both
}


@functools.cache
def usable() -> tuple[str, ...]:
    """The sets this process can compile with, "default" first: only "default" off CPU, when
    `XLA_FLAGS` already names the option (the user's choice stands), or when this jaxlib does
    not know it (experimental options come and go between releases)."""
    if jax.default_backend() != "cpu" or _OPTION in os.environ.get("XLA_FLAGS", ""):
        return ("default",)
    names = ["default"]
    for name, options in SETS.items():
        if not options:
            continue
        try:
            jax.jit(jnp.sum).lower(jnp.ones(8)).compile(compiler_options=options)
        except jax.errors.JaxRuntimeError:  # "No such compile option"
            continue
        names.append(name)
    return tuple(names)


def check(name: str) -> None:
    if name not in SETS:
        raise ValueError(f"unknown CPU kernel set {name!r}; known: {', '.join(SETS)}")


def jit(fn, kernels: str = "default", **kw):
    """`jax.jit(fn)` compiled with kernel set `kernels`, or with the default set where that one
    is not usable here (another backend, another jaxlib)."""
    check(kernels)
    # the default set needs no probing of what this jaxlib accepts
    options = SETS[kernels] if SETS[kernels] and kernels in usable() else {}
    return jax.jit(fn, compiler_options=options or None, **kw)
