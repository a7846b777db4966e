"""The weights that touch each channel of each site: what similarity and magnitude rank by.

A channel is described by every kernel entry that reads it or writes it, grouped like the site
multipliers as [heads, width, features].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _per_head(kernel: jax.Array, heads: int, axis: int) -> jax.Array:
    """Columns (axis=1) or rows (axis=0) of a kernel grouped as [heads, width, features]."""
    k = kernel if axis == 1 else kernel.T
    features = k.shape[0]
    return k.reshape(features, heads, -1).transpose(1, 2, 0)


def descriptors(block_params, heads: int, sites=("qk", "v", "hidden")) -> dict[str, jax.Array]:
    """{site: [heads, width, features]} for the requested sites of one block."""
    attn, mlp = block_params["attn"], block_params["mlp"]
    kernel = lambda p: jnp.asarray(p["kernel"])  # noqa: E731
    build = {
        "qk": lambda: jnp.concatenate(
            [_per_head(kernel(attn["q"]), heads, 1), _per_head(kernel(attn["k"]), heads, 1)], -1
        ),
        "v": lambda: jnp.concatenate(
            [_per_head(kernel(attn["v"]), heads, 1), _per_head(kernel(attn["proj"]), heads, 0)], -1
        ),
        "hidden": lambda: jnp.concatenate(
            [_per_head(kernel(mlp["fc1"]), 1, 1), _per_head(kernel(mlp["fc2"]), 1, 0)], -1
        ),
        "attn_in": lambda: jnp.concatenate([kernel(attn[n]) for n in ("q", "k", "v")], -1)[None],
        "mlp_in": lambda: kernel(mlp["fc1"])[None],
    }
    return {s: build[s]() for s in sites}


def magnitude(block_params, heads: int, sites) -> dict[str, jax.Array]:
    """L1 norm of the weights touching each channel: {site: [heads, width]}."""
    return {s: jnp.abs(d).sum(-1) for s, d in descriptors(block_params, heads, sites).items()}
