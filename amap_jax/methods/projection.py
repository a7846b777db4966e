"""Head-balanced projection: indicator logits -> binary channel masks.

Every head of a layer keeps the same number of channels, so the pruned layer still reshapes to
heads and exports to a smaller dense layer. The forward pass sees the binary mask; the backward
pass sees the importance scores (straight-through estimator).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from amap_jax.pruning import widths

# Logit magnitude that pins a mask: sigmoid(20) = 1 - 2e-9.
FIXED_LOGIT = 20.0


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """How a model turns its `indicators` collection into masks (hashable: a module field)."""

    min_keep: int = 1
    min_keep_fraction: float = 0.0  # per-head minimum as a share of the width (uninformed searches)
    multiple: int = 1
    head_balanced: bool = True
    straight_through: bool = True


def min_count(spec: PruneSpec, width: int) -> int:
    """The fewest channels a head of `width` may keep."""
    return widths.min_count(width, spec.min_keep, spec.min_keep_fraction)


def keep_count(logits: jax.Array, spec: PruneSpec) -> jax.Array:
    """Channels each head keeps: the soft count sum(sigmoid) shared evenly over the heads."""
    heads, width = logits.shape
    k = jnp.clip(jnp.round(jnp.sum(jax.nn.sigmoid(logits)) / heads), min_count(spec, width), width)
    if spec.multiple > 1:
        k = jnp.minimum(jnp.ceil(k / spec.multiple) * spec.multiple, width)
    return k.astype(jnp.int32)


def _layer_count(logits: jax.Array, spec: PruneSpec) -> jax.Array:
    """Channels the whole layer keeps when heads are not balanced."""
    heads, width = logits.shape
    k = jnp.round(jnp.sum(jax.nn.sigmoid(logits)))
    return jnp.clip(k, heads * min_count(spec, width), heads * width).astype(jnp.int32)


def importance(logits: jax.Array, weights: jax.Array | None) -> jax.Array:
    p = jax.nn.sigmoid(logits)
    return p if weights is None else p * weights


def rank(scores: jax.Array) -> jax.Array:
    """0 for the largest score along the last axis; ties broken by position."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def keep_top(scores: jax.Array, count, spec: PruneSpec) -> jax.Array:
    """Boolean [heads, width]: the top `count` per head, or (unbalanced) in the whole layer
    plus the top `min_count` of every head."""
    if spec.head_balanced:
        return rank(scores) < count
    flat_rank = rank(scores.reshape(-1)).reshape(scores.shape)
    return jnp.logical_or(flat_rank < count, rank(scores) < min_count(spec, scores.shape[-1]))


def hard_mask(logits: jax.Array, weights: jax.Array | None, spec: PruneSpec) -> jax.Array:
    """Binary [heads, width] mask: top-k importance in every head (or in the whole layer)."""
    a = importance(logits, weights)
    count = keep_count(logits, spec) if spec.head_balanced else _layer_count(logits, spec)
    return keep_top(a, count, spec).astype(a.dtype)


def mask(logits: jax.Array, weights: jax.Array | None, spec: PruneSpec) -> jax.Array:
    """Binary mask in the forward pass; gradient of the importance scores in the backward pass."""
    hard = hard_mask(jax.lax.stop_gradient(logits), weights, spec)
    if not spec.straight_through:
        return hard
    a = importance(logits, weights)
    return hard + (a - jax.lax.stop_gradient(a))  # parenthesised: exactly `hard` forward


def fixed_logits(binary_mask: jax.Array) -> jax.Array:
    """Logits that reproduce `binary_mask` under `hard_mask` with any positive weights."""
    return jnp.where(binary_mask > 0, FIXED_LOGIT, -FIXED_LOGIT).astype(jnp.float32)
