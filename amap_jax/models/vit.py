"""ViT/DeiT (optionally distilled) and FLatten-DeiT, built from a `ViTArch`.

The forward pass is split into `embed`, `run` (a range of blocks) and `head`, so that an
inference runner can drop tokens between blocks (`models.tokens`) with static shapes per call.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from amap_jax.models import tokens
from amap_jax.models.arch import ViTArch
from amap_jax.models.attention import dense_init
from amap_jax.models.block import Sites, blocks


class ViT(nn.Module):
    """Vision transformer with a class token (and DeiT's distillation token) and a learned
    position embedding; optionally with adaptive token dropping before `arch.token_points`."""

    arch: ViTArch
    sites: Sites | None = None  # a pruning method, or None: dense
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        a = self.arch
        p = a.patch_size
        self.embedding = nn.Conv(
            a.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype
        )
        self.cls = self.param("cls", nn.initializers.zeros, (1, 1, a.embed_dim))
        if a.distilled:
            self.dist_token = self.param("dist_token", nn.initializers.zeros, (1, 1, a.embed_dim))
        self.pos_embedding = self.param("pos_embedding", dense_init, (1, a.num_tokens, a.embed_dim))
        for i, block in enumerate(blocks(a, self.sites, self.dtype, named=False)):
            setattr(self, f"block_{i}", block)
        self.norm = nn.LayerNorm(a.norm_eps, dtype=self.dtype)
        dense = lambda: nn.Dense(  # noqa: E731
            a.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype
        )
        self.head = dense()
        if a.distilled:
            self.head_dist = dense()
        points = tokens.points(a, self.sites)
        if points:
            self.token_gate = tokens.gate(a, self.sites, points)

    def __call__(self, images, heads: bool = False):
        """Logits; tokens under a pruning point's threshold are masked out as keys (the same
        function as dropping them, see `models.tokens.predict`). A distilled model with
        `heads=True` gives (class head, distillation head) logits, for DeiT's training loss."""
        x = self.embed(images)
        points = tokens.points(self.arch, self.sites)
        keep, stats = None, None
        for i in range(len(self.arch.blocks)):
            if i in points:
                keep = self.token_gate(points.index(i), stats, keep)
            x, stats = self.run(x, i, i + 1, keep, stats=i + 1 in points)
        return self.logits(x, heads)

    def embed(self, images):
        a = self.arch
        x = self.embedding(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, a.embed_dim)
        prefix = [self.cls] + ([self.dist_token] if a.distilled else [])
        prefix = [jnp.broadcast_to(t, (x.shape[0], 1, a.embed_dim)).astype(x.dtype) for t in prefix]
        return jnp.concatenate([*prefix, x], 1) + self.pos_embedding.astype(x.dtype)

    def run(self, x, start: int, stop: int, key_mask=None, stats: bool = False):
        """Blocks [start, stop); with `stats`, the last one's class attention and head outputs
        (what token scores are made of)."""
        out = None
        for i in range(start, stop):
            last = stats and i == stop - 1
            x = getattr(self, f"block_{i}")(x, key_mask=key_mask, stats=last)
            if last:
                x, out = x
        return x, out

    def logits(self, x, heads: bool = False):
        x = self.norm(x)
        logits = self.head(x[:, 0]).astype(jnp.float32)
        if not self.arch.distilled:
            return logits
        dist = self.head_dist(x[:, 1]).astype(jnp.float32)
        # inference: the mean of the class and distillation heads
        return (logits, dist) if heads else (logits + dist) / 2
