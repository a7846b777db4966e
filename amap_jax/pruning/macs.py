"""Closed-form multiply-accumulate counts (MACs) per image.

One place for MACs counting. Widths may be floats (soft counts from a method's variables, for a
MACs loss) or ints (an exported architecture, for reporting). Element-wise work (norms, softmax,
activations) is not counted; XLA's cost analysis counts it, plus 2 FLOPs per multiply-add.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import numpy as np

from amap_jax.models.arch import SOFTMAX, Arch, BlockArch, Geometry, SwinArch


class Widths(NamedTuple):
    """What a block's MACs depend on: per-head q/k and v widths, MLP width, and how many residual
    channels feed q/k/v (`attn_in`) and fc1 (`mlp_in`). Floats or ints."""

    qk: float
    v: float
    hidden: float
    attn_in: float
    mlp_in: float


def widths(block: BlockArch, dim: int) -> Widths:
    """The widths an architecture's block has."""
    return Widths(
        block.qk_dim,
        block.v_dim,
        block.mlp_dim,
        len(block.attn_in) or dim,
        len(block.mlp_in) or dim,
    )


def as_widths(block: BlockArch, dim: int, w=None) -> Widths:
    """`w` as full `Widths`: None is the block's own, (qk, v, hidden) has its inputs unpruned."""
    if w is None:
        return widths(block, dim)
    if len(w) == 3:
        return Widths(*w, dim, dim)
    return w


def block_macs(
    block: BlockArch,
    geometry: Geometry,
    kernel_size: int,
    w: Widths | tuple | None = None,
    tokens=None,
):
    """MACs of one block; `tokens` (a number, or an array of one per image) replaces the token
    count of a ViT block whose other tokens were dropped."""
    g = geometry
    if tokens is not None:
        integer = hasattr(tokens, "dtype") and np.dtype(tokens.dtype).kind in "iu"
        if integer and not isinstance(tokens, jax.core.Tracer):
            tokens = np.asarray(tokens, np.int64)  # an image's MACs overflow int32 from DeiT-S up
        g = dataclasses.replace(g, tokens=tokens, window_tokens=tokens)
    qk, v, mlp, d_attn, d_mlp = as_widths(block, g.dim, w)
    h, t, d, n = block.heads, g.tokens, g.dim, g.window_tokens
    qk_all, v_all = h * qk, h * v
    total = t * d_attn * (2 * qk_all + v_all)  # q, k, v projections
    total = total + t * v_all * d  # output projection
    if block.attn == SOFTMAX:
        total = total + g.windows * n * n * (qk_all + v_all)  # q.k^T and attn.v
    else:
        total = total + g.windows * (2 * n * h * qk * v + n * qk_all)  # k^T v, q (k^T v), q.mean(k)
        total = total + g.windows * g.grid**2 * v_all * kernel_size**2  # depthwise conv on v
    return total + t * (d_mlp + d) * mlp  # fc1, fc2


def fixed_macs(arch: Arch) -> int:
    """What pruning does not touch: patch embedding, patch merging, classifier heads."""
    total = (arch.image_size // arch.patch_size) ** 2 * arch.patch_size**2 * arch.in_chans
    total *= arch.embed_dim
    if isinstance(arch, SwinArch):
        for s in range(1, len(arch.depths)):
            total += arch.resolution(s) ** 2 * 4 * arch.stage_dim(s - 1) * arch.stage_dim(s)
        return total + arch.num_features * arch.num_classes
    return total + arch.embed_dim * arch.num_classes * (2 if arch.distilled else 1)


def model_macs(arch: Arch, block_widths: list | None = None, tokens: list | None = None):
    """MACs of one image through `arch`, optionally with other per-block widths (`Widths`, or
    (qk, v, hidden) triples with unpruned inputs) and token counts (None: all tokens)."""
    total = fixed_macs(arch)
    for i, (block, g) in enumerate(zip(arch.blocks, arch.geometry(), strict=True)):
        w = None if block_widths is None else block_widths[i]
        n = None if tokens is None else tokens[i]
        total = total + block_macs(block, g, arch.kernel_size, w, n)
    return total


def token_counts(arch, points, kept) -> list:
    """Tokens each block sees (prefix included), from the tokens kept at each point: per image
    ([B] arrays) or single numbers."""
    out, n = [], arch.num_tokens
    for i in range(len(arch.blocks)):
        if i in points:
            n = kept[points.index(i)]
        out.append(n)
    return out


def ratio(arch: Arch, smaller: Arch) -> float:
    """MACs(smaller) / MACs(arch)."""
    return float(model_macs(smaller) / model_macs(arch))


def xla_macs(fn, *args) -> float:
    """MACs as XLA counts them (FLOPs / 2), from lowering only: nothing is run."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"]) / 2
