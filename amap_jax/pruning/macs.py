"""Closed-form multiply-accumulate counts (MACs) per image.

One place for MACs counting. Widths may be floats (soft counts from indicators, for the MACs
loss) or ints (the exported architecture, for reporting). Element-wise work (norms, softmax,
activations) is not counted; XLA's cost analysis counts it, plus 2 FLOPs per multiply-add.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amap_jax.models.arch import SOFTMAX, Arch, BlockArch, Geometry, SwinArch

Widths = tuple  # (qk_dim, v_dim, mlp_dim) per block; floats or ints


def block_macs(
    block: BlockArch, geometry: Geometry, kernel_size: int, widths: Widths | None = None
):
    qk, v, mlp = widths if widths is not None else (block.qk_dim, block.v_dim, block.mlp_dim)
    g = geometry
    h, t, d, n = block.heads, g.tokens, g.dim, g.window_tokens
    qk_all, v_all = h * qk, h * v
    total = t * d * (2 * qk_all + v_all)  # q, k, v projections
    total = total + t * v_all * d  # output projection
    if block.attn == SOFTMAX:
        total = total + g.windows * n * n * (qk_all + v_all)  # q.k^T and attn.v
    else:
        total = total + g.windows * (2 * n * h * qk * v + n * qk_all)  # k^T v, q (k^T v), q.mean(k)
        total = total + g.windows * g.grid**2 * v_all * kernel_size**2  # depthwise conv on v
    return total + 2 * t * d * mlp


def fixed_macs(arch: Arch) -> int:
    """What pruning does not touch: patch embedding, patch merging, classifier heads."""
    total = (arch.image_size // arch.patch_size) ** 2 * arch.patch_size**2 * arch.in_chans
    total *= arch.embed_dim
    if isinstance(arch, SwinArch):
        for s in range(1, len(arch.depths)):
            total += arch.resolution(s) ** 2 * 4 * arch.stage_dim(s - 1) * arch.stage_dim(s)
        return total + arch.num_features * arch.num_classes
    return total + arch.embed_dim * arch.num_classes * (2 if arch.distilled else 1)


def model_macs(arch: Arch, widths: list[Widths] | None = None):
    """MACs of one image through `arch`, optionally with other per-block widths."""
    total = fixed_macs(arch)
    for i, (block, g) in enumerate(zip(arch.blocks, arch.geometry(), strict=True)):
        w = None if widths is None else widths[i]
        total = total + block_macs(block, g, arch.kernel_size, w)
    return total


def soft_widths(arch: Arch, indicators) -> list[Widths]:
    """Expected per-head widths: sum of keep-probabilities over a group, divided by its heads."""
    out = []
    for i, block in enumerate(arch.blocks):
        ind = indicators[f"block_{i}"]
        out.append(
            tuple(
                jnp.sum(jax.nn.sigmoid(ind[g])) / (block.heads if g != "hidden" else 1)
                for g in ("qk", "v", "hidden")
            )
        )
    return out


def soft_ratio(arch: Arch, indicators) -> jax.Array:
    """Differentiable MACs(indicators) / MACs(dense)."""
    return model_macs(arch, soft_widths(arch, indicators)) / float(model_macs(arch))


def xla_macs(fn, *args) -> float:
    """MACs as XLA counts them (FLOPs / 2), from lowering only: nothing is run."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"]) / 2
