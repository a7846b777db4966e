"""ViT/DeiT and FLatten-DeiT, built from a `ViTArch`.

With a `PruneSpec`, every block declares its pruning indicators in the `indicators` collection
and its channel-similarity weights in the `similarity` collection, and masks itself with the
head-balanced projection. Without one it is a plain dense model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from amap_jax.models.arch import BlockArch, ViTArch
from amap_jax.models.attention import Attention, dense_init
from amap_jax.pruning import projection
from amap_jax.pruning.projection import PruneSpec

INDICATORS = "indicators"
SIMILARITY = "similarity"


def group_shapes(block: BlockArch) -> dict[str, tuple[int, int]]:
    """Prunable channel groups of a block as [heads, width]; the MLP is one 'head'."""
    return {
        "qk": (block.heads, block.qk_dim),
        "v": (block.heads, block.v_dim),
        "hidden": (1, block.mlp_dim),
    }


class Mlp(nn.Module):
    hidden: int
    out: int
    reweight: bool = False
    gelu_approximate: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype, name="fc1")(x)
        h = nn.gelu(h, approximate=self.gelu_approximate)
        scale = mask
        if self.reweight:
            r = self.param("reweight", nn.initializers.ones, (self.hidden,))
            scale = r if scale is None else scale * r
        if scale is not None:
            h = h * scale.astype(h.dtype)
        return nn.Dense(self.out, kernel_init=dense_init, dtype=self.dtype, name="fc2")(h)


class Block(nn.Module):
    arch: BlockArch
    embed_dim: int
    num_tokens: int
    grid: int
    focusing_factor: float = 3.0
    kernel_size: int = 5
    reweight: bool = False
    gelu_approximate: bool = False
    prune: PruneSpec | None = None
    init_logit: float = 3.0
    dtype: jnp.dtype = jnp.float32

    def masks(self) -> dict[str, jax.Array] | None:
        if self.prune is None:
            return None
        out = {}
        for name, shape in group_shapes(self.arch).items():
            s = self.variable(INDICATORS, name, lambda s=shape: jnp.full(s, self.init_logit)).value
            w = None  # similarity weights are optional at apply time
            if self.is_initializing() or self.has_variable(SIMILARITY, name):
                w = self.variable(SIMILARITY, name, lambda s=shape: jnp.ones(s)).value
            out[name] = projection.mask(s, w, self.prune).reshape(-1)
        return out

    @nn.compact
    def __call__(self, x):
        m = self.masks() or {}
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        self.sow("intermediates", "attn_input", y)
        x = x + Attention(
            self.arch,
            self.embed_dim,
            self.num_tokens,
            self.grid,
            self.focusing_factor,
            self.kernel_size,
            self.reweight,
            self.dtype,
            name="attn",
        )(y, m.get("qk"), m.get("v"))
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        mlp = Mlp(
            self.arch.mlp_dim,
            self.embed_dim,
            self.reweight,
            self.gelu_approximate,
            self.dtype,
            name="mlp",
        )
        return x + mlp(y, m.get("hidden"))


class ViT(nn.Module):
    """Vision transformer with a class token and a learned position embedding."""

    arch: ViTArch
    prune: PruneSpec | None = None
    init_logit: float = 3.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        a = self.arch
        x = nn.Conv(
            a.embed_dim,
            (a.patch_size, a.patch_size),
            strides=(a.patch_size, a.patch_size),
            padding="VALID",
            dtype=self.dtype,
            name="embedding",
        )(images.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, a.embed_dim)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, a.embed_dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, a.embed_dim)).astype(x.dtype), x], 1)
        pos = self.param("pos_embedding", dense_init, (1, a.num_tokens, a.embed_dim))
        x = x + pos.astype(x.dtype)
        for i, block in enumerate(a.blocks):
            x = Block(
                block,
                a.embed_dim,
                a.num_tokens,
                a.grid,
                focusing_factor=a.focusing_factor,
                kernel_size=a.kernel_size,
                reweight=a.reweight,
                gelu_approximate=a.gelu_approximate,
                prune=self.prune,
                init_logit=self.init_logit,
                dtype=self.dtype,
                name=f"block_{i}",
            )(x)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        head = nn.Dense(
            a.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head"
        )
        return head(x[:, 0]).astype(jnp.float32)


def dummy_input(arch: ViTArch, batch: int = 1) -> jax.Array:
    return jnp.zeros((batch, arch.image_size, arch.image_size, arch.in_chans), jnp.float32)
