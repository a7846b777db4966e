"""Adaptive token dropping: the sixth kind of site, between blocks of a ViT.

Before a pruning point, every patch token gets a score: the class token's attention to it in the
block before, summed over heads weighted by how much each head's output for that token counts
(its norm, normalised over heads), times the number of patch tokens so that a uniform map scores
1. Tokens at or below the point's threshold are dropped: masked out as keys of every later block
while training (`ViT.__call__`), really removed at inference (`predict`). The class and
distillation tokens are always kept, and every token still attends to itself, so the masked
forward and the dropping forward compute the same logits.

Depthwise convolutions of focused linear attention need the whole token grid, so pruning
points must come after the last linear block; a model without a class token (Swin) has none.
"""

from __future__ import annotations

import math
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amap_jax.models.arch import LINEAR, ViTArch

REPORTS = "reports"  # what a forward pass reports to the loss: the keep mask at every point


class TokenSites(Protocol):
    """What a token-pruning method gives a ViT (hashable: a module field)."""

    def token_points(self, arch: ViTArch) -> tuple[int, ...]:
        """Blocks before which tokens may be dropped."""
        ...

    def token_mask(self, gate: nn.Module, k: int, score: jax.Array) -> jax.Array:
        """[B, N] keep mask at the k-th point (declares its variables in `gate`)."""
        ...


def check_points(arch, points) -> tuple[int, ...]:
    """Valid pruning points, or a one-line ValueError."""
    if not isinstance(arch, ViTArch):
        raise ValueError(f"token pruning needs a class token; {arch.name or 'this model'} has none")
    points = tuple(int(p) for p in points)
    depth = len(arch.blocks)
    if list(points) != sorted(set(points)) or not all(1 <= p < depth for p in points):
        raise ValueError(
            f"token pruning points {points} must be increasing block indices in [1, {depth})"
        )
    linear = [i for i, b in enumerate(arch.blocks) if b.attn == LINEAR]
    if linear and points and points[0] <= linear[-1]:
        raise ValueError(
            f"token pruning point {points[0]} comes before linear block {linear[-1]}, whose "
            "depthwise convolution needs every token"
        )
    return points


def points(arch, sites) -> tuple[int, ...]:
    """The pruning points of a model: the method's while searching, the architecture's after."""
    if sites is not None and hasattr(sites, "token_points"):
        return sites.token_points(arch)
    return getattr(arch, "token_points", ())


def score(stats, arch: ViTArch) -> jax.Array:
    """[B, N] token scores from a block's (class attention [B, H, N], head output norms
    [B, H, N]), scaled by the image's patch count (not the tokens left: dropping must not
    change a score); prefix tokens score +inf (always kept)."""
    cls_attn, norms = stats
    weight = norms / (jnp.sum(norms, axis=1, keepdims=True) + 1e-12)
    s = jnp.sum(cls_attn * weight, axis=1) * arch.grid**2
    return s.at[:, : arch.num_prefix].set(jnp.inf)


class TokenGate(nn.Module):
    """The keep mask at each pruning point: the method's while searching, else the learnt
    thresholds of an exported model (`thresholds`, one per point)."""

    arch: ViTArch
    num_points: int
    sites: TokenSites | None = None

    @nn.compact
    def __call__(self, k: int, stats, keep=None):
        s = score(stats, self.arch)
        if self.sites is not None and hasattr(self.sites, "token_mask"):
            mask = self.sites.token_mask(self, k, s)
        else:
            thresholds = self.param("thresholds", nn.initializers.zeros, (self.num_points,))
            mask = (s > thresholds[k]).astype(s.dtype)
        mask = mask if keep is None else mask * keep
        self.sow(REPORTS, "keep", mask)
        return mask


def gate(arch, sites, pts) -> TokenGate:
    return TokenGate(arch, len(pts), sites if hasattr(sites, "token_mask") else None)


def _bucket(count: int, multiple: int | None, limit: int) -> int:
    if not multiple:
        return count
    return min(int(math.ceil(count / multiple) * multiple), limit)


def predict(model, variables, images, *, multiple: int | None = None):
    """Logits with tokens really dropped, and the tokens each image kept per point.

    Each point keeps, for the whole batch, K = the largest count of kept tokens, rounded up to
    `multiple` (None: exact; what batch-1 inference uses). Images with fewer keep their extra
    tokens masked out as keys, so every image gets its batch-1 logits whatever the bucket.
    Each segment between points is one compiled call per K; the host only reads the per-image
    counts, to choose the next K.
    """
    arch = model.arch
    pts = points(arch, model.sites)
    bounds = [0, *pts, len(arch.blocks)]
    x, keep, size = images, None, None
    counts = []
    for k in range(len(pts)):
        x, keep, kept = _segment(model, bounds[k], bounds[k + 1], size)(variables, x, keep)
        kept = np.asarray(kept)
        counts.append(kept - arch.num_prefix)
        size = _bucket(int(kept.max()), multiple, size or keep.shape[1])  # never above the last K
    logits = _segment(model, bounds[-2], bounds[-1], size)(variables, x, keep)
    return logits, np.stack(counts, -1) if counts else None


_CACHE: dict = {}


def _segment(model, start: int, stop: int, size: int | None):
    """Blocks [start, stop) on the images (start 0) or on the first `size` tokens of the last
    segment's output; returns the logits (stop = depth), or every token with the kept ones
    first (each group in its original order), padded back to the full count so that the next
    segment compiles once per `size`, with their mask and the kept count of each image."""
    key = (model, start, stop, size)
    if key in _CACHE:
        return _CACHE[key]
    k = points(model.arch, model.sites).index(stop) if stop < len(model.arch.blocks) else None

    def segment(m, x, keep):
        if start == 0:
            x = m.embed(x)
        else:
            x, keep = x[:, :size], keep[:, :size]
        x, stats = m.run(x, start, stop, keep, stats=k is not None)
        if k is None:
            return m.logits(x)
        mask = m.token_gate(k, stats, keep)
        order = jnp.argsort(-mask, axis=-1, stable=True)
        pad = model.arch.num_tokens - x.shape[1]
        return (
            jnp.pad(jnp.take_along_axis(x, order[..., None], axis=1), ((0, 0), (0, pad), (0, 0))),
            jnp.pad(jnp.take_along_axis(mask, order, axis=-1), ((0, 0), (0, pad))),
            mask.sum(-1).astype(jnp.int32),
        )

    _CACHE[key] = jax.jit(lambda v, x, keep: model.apply(v, x, keep, method=segment))
    return _CACHE[key]
