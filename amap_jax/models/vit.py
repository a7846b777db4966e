"""ViT/DeiT (optionally distilled) and FLatten-DeiT, built from a `ViTArch`."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from amap_jax.models.arch import ViTArch
from amap_jax.models.attention import dense_init
from amap_jax.models.block import Sites, blocks, embed_patches


class ViT(nn.Module):
    """Vision transformer with a class token (and DeiT's distillation token) and a learned
    position embedding."""

    arch: ViTArch
    sites: Sites | None = None  # a pruning method, or None: dense
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        a = self.arch
        x = embed_patches(a, images, self.dtype)
        b = x.shape[0]
        tokens = [self.param("cls", nn.initializers.zeros, (1, 1, a.embed_dim))]
        if a.distilled:
            tokens.append(self.param("dist_token", nn.initializers.zeros, (1, 1, a.embed_dim)))
        prefix = [jnp.broadcast_to(t, (b, 1, a.embed_dim)).astype(x.dtype) for t in tokens]
        x = jnp.concatenate([*prefix, x], 1)
        pos = self.param("pos_embedding", dense_init, (1, a.num_tokens, a.embed_dim))
        x = x + pos.astype(x.dtype)
        for block in blocks(a, self.sites, self.dtype):
            x = block(x)
        x = nn.LayerNorm(a.norm_eps, dtype=self.dtype, name="norm")(x)
        head = lambda name: nn.Dense(  # noqa: E731
            a.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name=name
        )
        logits = head("head")(x[:, 0])
        if a.distilled:  # inference: the mean of the class and distillation heads
            logits = (logits + head("head_dist")(x[:, 1])) / 2
        return logits.astype(jnp.float32)
