"""The transformer block every model is built from, and its pruning hooks.

With a `PruneSpec`, a block declares its pruning indicators in the `indicators` collection and
its channel-similarity weights in the `similarity` collection, and masks itself with the
head-balanced projection. Without one it is a plain dense block.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from amap_jax.models.arch import BlockArch, Geometry
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


def to_windows(x: jax.Array, block: BlockArch, resolution: int) -> jax.Array:
    """[B, r*r, C] token map -> [B*windows, w*w, C], cyclically shifted first."""
    b, _, c = x.shape
    r, w = resolution, block.window
    x = x.reshape(b, r, r, c)
    if block.shift:
        x = jnp.roll(x, (-block.shift, -block.shift), axis=(1, 2))
    x = x.reshape(b, r // w, w, r // w, w, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def from_windows(x: jax.Array, block: BlockArch, resolution: int) -> jax.Array:
    """Inverse of `to_windows`."""
    r, w, c = resolution, block.window, x.shape[-1]
    x = x.reshape(-1, r // w, r // w, w, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, r, r, c)
    if block.shift:
        x = jnp.roll(x, (block.shift, block.shift), axis=(1, 2))
    return x.reshape(-1, r * r, c)


class Block(nn.Module):
    arch: BlockArch
    geometry: Geometry
    focusing_factor: float = 3.0
    kernel_size: int = 5
    reweight: bool = False
    gelu_approximate: bool = False
    norm_eps: float = 1e-6
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
        g = self.geometry
        norm = lambda name: nn.LayerNorm(self.norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        y = norm("norm1")(x)
        if g.resolution:
            y = to_windows(y, self.arch, g.resolution)
        self.sow("intermediates", "attn_input", y)
        attn = Attention(
            self.arch,
            g,
            self.focusing_factor,
            self.kernel_size,
            self.reweight,
            self.dtype,
            name="attn",
        )
        y = attn(y, m.get("qk"), m.get("v"))
        if g.resolution:
            y = from_windows(y, self.arch, g.resolution)
        x = x + y
        mlp = Mlp(
            self.arch.mlp_dim, g.dim, self.reweight, self.gelu_approximate, self.dtype, name="mlp"
        )
        return x + mlp(norm("norm2")(x), m.get("hidden"))


def embed_patches(arch, images: jax.Array, dtype) -> jax.Array:
    """Non-overlapping patches -> tokens [B, N, embed_dim]: a strided conv named `embedding`
    (call from a compact method: the conv belongs to the calling model)."""
    p = arch.patch_size
    x = nn.Conv(
        arch.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="embedding"
    )(images.astype(dtype))
    return x.reshape(x.shape[0], -1, arch.embed_dim)


def attention(arch, i: int) -> Attention:
    """Block i's attention alone, to apply to its recorded `attn_input` with its `attn` params."""
    b, g = arch.blocks[i], arch.geometry()[i]
    return Attention(b, g, arch.focusing_factor, arch.kernel_size, arch.reweight)


def blocks(arch, prune: PruneSpec | None, init_logit: float, dtype) -> list[Block]:
    """Every block of `arch`, named `block_{i}` in one flat sequence (stages included)."""
    return [
        Block(
            b,
            g,
            arch.focusing_factor,
            arch.kernel_size,
            arch.reweight,
            arch.gelu_approximate,
            arch.norm_eps,
            prune,
            init_logit,
            dtype,
            name=f"block_{i}",
        )
        for i, (b, g) in enumerate(zip(arch.blocks, arch.geometry(), strict=True))
    ]
