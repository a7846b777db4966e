"""Channel-similarity weights: a channel much like the others in its head is the one to drop.

Each channel is described by the weights that touch it; its redundancy is its mean absolute
cosine similarity to the other channels of the same head; its weight is (1 - redundancy),
normalised to mean 1 within the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amap_jax.models.arch import Arch

EPS = 1e-3  # floor, so a fully redundant channel still ranks by its indicator


def _per_head(kernel: jax.Array, heads: int, axis: int) -> jax.Array:
    """Columns (axis=1) or rows (axis=0) of a kernel grouped as [heads, width, features]."""
    k = kernel if axis == 1 else kernel.T
    features = k.shape[0]
    return k.reshape(features, heads, -1).transpose(1, 2, 0)


def descriptors(block_params, heads: int) -> dict[str, jax.Array]:
    attn, mlp = block_params["attn"], block_params["mlp"]
    q = _per_head(attn["q"]["kernel"], heads, 1)
    k = _per_head(attn["k"]["kernel"], heads, 1)
    v = _per_head(attn["v"]["kernel"], heads, 1)
    proj = _per_head(attn["proj"]["kernel"], heads, 0)
    fc1 = _per_head(mlp["fc1"]["kernel"], 1, 1)
    fc2 = _per_head(mlp["fc2"]["kernel"], 1, 0)
    return {
        "qk": jnp.concatenate([q, k], -1),
        "v": jnp.concatenate([v, proj], -1),
        "hidden": jnp.concatenate([fc1, fc2], -1),
    }


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
