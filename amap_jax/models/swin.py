"""Swin and FLatten-Swin, built from a `SwinArch`.

Stages of blocks at halving resolution joined by patch merging, then global average pooling.
Blocks are named `block_{i}` in one flat sequence over all stages, as in a ViT, so indicators,
similarity weights and export address both model families the same way.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from amap_jax.models.arch import SwinArch
from amap_jax.models.attention import dense_init
from amap_jax.models.block import Sites, blocks, embed_patches


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one token of twice the width.

    The four sub-pixels are concatenated as (0,0), (1,0), (0,1), (1,1) (row, column offsets),
    the order of the reference implementations, so imported weights line up.
    """

    out_dim: int
    norm_eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, resolution: int):
        b, _, c = x.shape
        r = resolution // 2
        x = x.reshape(b, r, 2, r, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, r * r, 4 * c)
        x = nn.LayerNorm(self.norm_eps, dtype=self.dtype, name="norm")(x)
        return nn.Dense(
            self.out_dim, use_bias=False, kernel_init=dense_init, dtype=self.dtype, name="reduction"
        )(x)


class Swin(nn.Module):
    arch: SwinArch
    sites: Sites | None = None  # a pruning method, or None: dense
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        a = self.arch
        x = embed_patches(a, images, self.dtype)
        x = nn.LayerNorm(a.norm_eps, dtype=self.dtype, name="embedding_norm")(x)
        stage = 0
        for block, s in zip(blocks(a, self.sites, self.dtype), a.stages(), strict=True):
            if s != stage:
                merge = PatchMerging(a.stage_dim(s), a.norm_eps, self.dtype, name=f"merge_{s}")
                x, stage = merge(x, a.resolution(stage)), s
            x = block(x)
        x = nn.LayerNorm(a.norm_eps, dtype=self.dtype, name="norm")(x)
        head = nn.Dense(
            a.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head"
        )
        return head(jnp.mean(x, axis=1)).astype(jnp.float32)
