"""Model families behind one entry point: an architecture description in, a Flax module out."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amap_jax.models.arch import Arch, SwinArch, ViTArch, arch_from_dict
from amap_jax.models.block import SITES, Sites, attention, site_shapes
from amap_jax.models.swin import Swin
from amap_jax.models.vit import ViT

__all__ = [
    "SITES",
    "Sites",
    "Swin",
    "ViT",
    "arch_from_dict",
    "attention",
    "build",
    "compute_dtype",
    "dummy_input",
    "site_shapes",
]


def build(arch: Arch, sites: Sites | None = None, **kw):
    """The module for `arch`: dense, or with a pruning method at its sites."""
    if isinstance(arch, SwinArch):
        return Swin(arch, sites=sites, **kw)
    if isinstance(arch, ViTArch):
        return ViT(arch, sites=sites, **kw)
    raise TypeError(f"not an architecture description: {type(arch).__name__}")


def compute_dtype(name: str):
    """The jnp dtype a config's `model.dtype` name ("float32" or "bfloat16") computes in."""
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def dummy_input(arch: Arch, batch: int = 1) -> jax.Array:
    """Zero images of the model's input shape, for `init` and tracing."""
    return jnp.zeros((batch, arch.image_size, arch.image_size, arch.in_chans), jnp.float32)
