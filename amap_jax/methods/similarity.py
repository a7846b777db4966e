"""Channel-similarity weights: a channel much like the others in its head is the one to drop.

Each channel is described by the weights that touch it; its redundancy is its mean absolute
cosine similarity to the other channels of the same head; its weight is (1 - redundancy),
normalised to mean 1 within the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amap_jax.models.arch import Arch
from amap_jax.pruning.channels import descriptors

EPS = 1e-3  # floor, so a fully redundant channel still ranks by its indicator


def redundancy_weights(desc: jax.Array) -> jax.Array:
    """[heads, width, features] -> [heads, width] weights with mean 1 per head."""
    width = desc.shape[1]
    if width == 1:
        return jnp.ones(desc.shape[:2], desc.dtype)
    x = desc / (jnp.linalg.norm(desc, axis=-1, keepdims=True) + 1e-12)
    sim = jnp.abs(jnp.matmul(x, x.swapaxes(-1, -2)))
    off_diag = (jnp.sum(sim, -1) - jnp.diagonal(sim, axis1=-2, axis2=-1)) / (width - 1)
    w = jnp.clip(1.0 - off_diag, 0.0, None)
    w = w / (jnp.mean(w, axis=-1, keepdims=True) + 1e-12)
    return jnp.maximum(w, EPS)


def similarity_weights(arch: Arch, params):
    """Weights for every block, in the shape of the `indicators` collection."""
    return {
        f"block_{i}": {
            g: redundancy_weights(d) for g, d in descriptors(params[f"block_{i}"], b.heads).items()
        }
        for i, b in enumerate(arch.blocks)
    }
