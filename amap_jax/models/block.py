"""The transformer block every model is built from, and the sites where a method may act.

A block knows no pruning method. It exposes five named **sites**, vectors a method may multiply
onto the features, and asks one `Sites` object (the method, or nothing for a dense model) what
to put there:

| site      | shape    | what it scales                                                  |
|-----------|----------|-----------------------------------------------------------------|
| `attn_in` | [1, D]   | LayerNorm-1 output feeding q/k/v                                |
| `qk`      | [H, dqk] | q and k channel pairs (after the ReLU of focused attention)     |
| `v`       | [H, dv]  | value = attention-output channels, before the output projection |
| `mlp_in`  | [1, D]   | LayerNorm-2 output feeding fc1                                  |
| `hidden`  | [1, F]   | MLP hidden units, before fc2                                    |

A zero multiplier is where an exported model has no channel at all, so the masked model and the
exported smaller model compute the same function.
"""

from __future__ import annotations

from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from amap_jax.models.arch import BlockArch, Geometry
from amap_jax.models.attention import Attention, Dense

SITES = ("attn_in", "qk", "v", "mlp_in", "hidden")


def site_shapes(block: BlockArch, dim: int) -> dict[str, tuple[int, int]]:
    """Every site of a block as [heads, width]; input dims and the MLP are one 'head'."""
    return {
        "attn_in": (1, len(block.attn_in) or dim),
        "qk": (block.heads, block.qk_dim),
        "v": (block.heads, block.v_dim),
        "mlp_in": (1, len(block.mlp_in) or dim),
        "hidden": (1, block.mlp_dim),
    }


class Sites(Protocol):
    """What a block asks for its multipliers (a pruning method implements this).

    Must be hashable: it is a field of the Flax modules.
    """

    def declare(self, block: nn.Module, shapes: dict[str, tuple[int, int]]) -> dict[str, jax.Array]:
        """Declares the method's variables in `block`'s scope; returns {site: multiplier [H, w]}
        for the sites it uses."""
        ...


class Mlp(nn.Module):
    hidden: int
    out: int
    gelu_approximate: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, scale=None):
        h = Dense(self.hidden, self.dtype, name="fc1")(x)
        h = nn.gelu(h, approximate=self.gelu_approximate)
        return Dense(self.out, self.dtype, name="fc2")(h, rows=scale)  # hidden units scaled


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


def _input(y: jax.Array, kept: tuple[int, ...], scale: jax.Array | None) -> jax.Array:
    """A LayerNorm output as its consumers see it: kept channels gathered, then scaled."""
    if kept:
        y = jnp.take(y, jnp.asarray(kept), axis=-1)
    return y if scale is None else y * scale.astype(y.dtype)


class Block(nn.Module):
    arch: BlockArch
    geometry: Geometry
    focusing_factor: float = 3.0
    kernel_size: int = 5
    gelu_approximate: bool = False
    norm_eps: float = 1e-6
    sites: Sites | None = None
    dtype: jnp.dtype = jnp.float32
    head_weight: str = "value"  # token scores' head weight (`Attention.head_weight`)

    @nn.compact
    def __call__(self, x, key_mask=None, stats=False):
        """`key_mask` and `stats`: token pruning (`models.tokens`, `Attention`)."""
        g, a = self.geometry, self.arch
        m = {}
        if self.sites is not None:
            shapes = site_shapes(a, g.dim)
            m = {k: v.reshape(-1) for k, v in self.sites.declare(self, shapes).items()}
        norm = lambda name: nn.LayerNorm(self.norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        y = _input(norm("norm1")(x), a.attn_in, m.get("attn_in"))
        if g.resolution:
            y = to_windows(y, a, g.resolution)
        self.sow("intermediates", "attn_input", y)
        attn = Attention(
            a,
            g,
            self.focusing_factor,
            self.kernel_size,
            self.dtype,
            self.head_weight,
            name="attn",
        )
        y = attn(y, m.get("qk"), m.get("v"), key_mask, stats)
        if stats:
            y, token_stats = y
        if g.resolution:
            y = from_windows(y, a, g.resolution)
        x = x + y
        mlp = Mlp(a.mlp_dim, g.dim, self.gelu_approximate, self.dtype, name="mlp")
        y = _input(norm("norm2")(x), a.mlp_in, m.get("mlp_in"))
        self.sow("intermediates", "mlp_input", y)
        x = x + mlp(y, m.get("hidden"))
        return (x, token_stats) if stats else x


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
    return Attention(b, g, arch.focusing_factor, arch.kernel_size, head_weight=head_weight_of(arch))


def head_weight_of(arch) -> str:
    """How token scores weight heads (`ViTArch.token_head_weight`; other families: default)."""
    return getattr(arch, "token_head_weight", "value")


def blocks(arch, sites: Sites | None, dtype, named: bool = True) -> list[Block]:
    """Every block of `arch`, named `block_{i}` in one flat sequence (stages included); a
    module that builds them in `setup` names them itself (`named=False`)."""
    return [
        Block(
            b,
            g,
            arch.focusing_factor,
            arch.kernel_size,
            arch.gelu_approximate,
            arch.norm_eps,
            sites,
            dtype,
            head_weight_of(arch),
            **({"name": f"block_{i}"} if named else {}),
        )
        for i, (b, g) in enumerate(zip(arch.blocks, arch.geometry(), strict=True))
    ]
