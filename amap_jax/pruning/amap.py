"""AMAP: indicators, similarity weights, head-balanced masks, reweighting, a MACs target.

The pieces that are specific to the search: turning a dense model into a searchable one,
initialising the indicators (constant, or from attention differences), the MACs loss, and
fixing the final masks so that the hard MACs meet the target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax import models
from amap_jax.models.arch import LINEAR, Arch
from amap_jax.models.block import INDICATORS, SIMILARITY, group_shapes
from amap_jax.pruning import macs, projection
from amap_jax.pruning.projection import PruneSpec

_GROUPS = ("qk", "v", "hidden")


def add_reweight(arch: Arch, params) -> tuple[Arch, dict]:
    """Adds reweight scales (init 1: the function is unchanged) to every block."""
    params = dict(params)
    for i, b in enumerate(arch.blocks):
        blk = dict(params[f"block_{i}"])
        blk["attn"] = {**blk["attn"], "reweight": jnp.ones((b.heads * b.v_dim,))}
        blk["mlp"] = {**blk["mlp"], "reweight": jnp.ones((b.mlp_dim,))}
        params[f"block_{i}"] = blk
    return arch.replace(reweight=True), params


def constant_indicators(arch: Arch, logit: float):
    return {
        f"block_{i}": {g: jnp.full(s, logit, jnp.float32) for g, s in group_shapes(b).items()}
        for i, b in enumerate(arch.blocks)
    }


def attention_difference(arch: Arch, params, images, *, softmax_too: bool = False, chunk: int = 16):
    """Per block, relative change of the attention output when one channel is removed.

    Returns {'block_i': {'qk': [H, dqk], 'v': [H, dv]}} for linear-attention blocks (and
    softmax blocks if `softmax_too`): ||A(x) - A_{-c}(x)||_F / ||A(x)||_F averaged over images.
    """
    _, inter = models.build(arch).apply({"params": params}, images, mutable=["intermediates"])
    out = {}
    for i, b in enumerate(arch.blocks):
        if b.attn != LINEAR and not softmax_too:
            continue
        y = inter["intermediates"][f"block_{i}"]["attn_input"][0]
        attn = models.attention(arch, i)
        variables = {"params": params[f"block_{i}"]["attn"]}
        base = attn.apply(variables, y)
        base_norm = jnp.linalg.norm(base.reshape(base.shape[0], -1), axis=-1) + 1e-12

        def rel_diff(
            qk_mask, v_mask, attn=attn, variables=variables, y=y, base=base, base_norm=base_norm
        ):
            o = attn.apply(variables, y, qk_mask, v_mask)
            d = jnp.linalg.norm((o - base).reshape(o.shape[0], -1), axis=-1)
            return jnp.mean(d / base_norm)

        qk_drop = 1.0 - jnp.eye(b.heads * b.qk_dim)
        v_drop = 1.0 - jnp.eye(b.heads * b.v_dim)
        qk = jax.lax.map(lambda m, f=rel_diff: f(m, None), qk_drop, batch_size=chunk)
        v = jax.lax.map(lambda m, f=rel_diff: f(None, m), v_drop, batch_size=chunk)
        out[f"block_{i}"] = {"qk": qk.reshape(b.heads, b.qk_dim), "v": v.reshape(b.heads, b.v_dim)}
    return out


def logits_from_scores(scores: jax.Array, base: float, spread: float) -> jax.Array:
    """Initial logits rising with the score: base + spread * z-score over the group."""
    z = (scores - scores.mean()) / (scores.std() + 1e-12)
    return base + spread * z


def init_indicators(arch: Arch, params, cfg, calib_images=None):
    """Indicator logits as the config says: constant, or attention-difference where measured."""
    ind = constant_indicators(arch, cfg.init_logit)
    if cfg.init == "constant":
        return ind
    if cfg.init != "attn_diff":
        raise ValueError(f"search.init must be 'constant' or 'attn_diff', got {cfg.init!r}")
    if calib_images is None:
        raise ValueError("attn_diff initialisation needs a calibration batch")
    diffs = attention_difference(arch, params, calib_images, softmax_too=cfg.init_on_softmax)
    for blk, groups in diffs.items():
        for g, d in groups.items():
            ind[blk][g] = logits_from_scores(d, cfg.init_logit, cfg.init_spread)
    return ind


def macs_regularizer(arch: Arch, target: float, weight: float, kind: str = "square"):
    """`trainable -> (loss, metrics)`: weight * (MACs_soft / MACs_dense - target)^2 (or hinge)."""
    if kind not in ("square", "hinge"):
        raise ValueError(f"search.macs_loss must be 'square' or 'hinge', got {kind!r}")

    def reg(trainable):
        ratio = macs.soft_ratio(arch, trainable[INDICATORS])
        gap = ratio - target
        if kind == "hinge":
            gap = jax.nn.relu(gap)
        return weight * gap**2, {"macs_ratio": ratio}

    return reg


def hard_widths(arch: Arch, variables, spec: PruneSpec) -> list[tuple[int, int, int]]:
    """Per-head widths the masks keep now (what export would produce)."""
    ind = variables[INDICATORS]
    return [
        tuple(int(projection.keep_count(ind[f"block_{i}"][g], spec)) for g in _GROUPS)
        for i in range(len(arch.blocks))
    ]


def hard_ratio(arch: Arch, variables, spec: PruneSpec) -> float:
    return float(macs.model_macs(arch, hard_widths(arch, variables, spec)) / macs.model_macs(arch))


def finalize(arch: Arch, variables, spec: PruneSpec, target: float):
    """Fixed indicator logits whose masks meet `target` MACs ratio.

    Starts from the masks the search ended with and, while the hard MACs are over the target,
    removes channels (one per head at a time) where the least importance is lost per MAC saved.
    Without head balancing a layer is one pool of channels whose MACs count as its mean
    per-head width; the export then pads to the widest head, which costs more than that.
    """
    ind, sim = variables[INDICATORS], variables.get(SIMILARITY)
    balanced = spec.head_balanced
    imp, scores, counts, heads, widths = {}, {}, {}, {}, {}
    for i in range(len(arch.blocks)):
        for g in _GROUPS:
            logits = ind[f"block_{i}"][g]
            w = None if sim is None else sim[f"block_{i}"][g]
            imp[i, g] = a = np.asarray(projection.importance(logits, w))
            heads[i, g] = 1 if balanced else a.shape[0]
            widths[i, g] = a.shape[1]
            pool = a if balanced else a.reshape(1, -1)  # unbalanced: one pool per layer
            scores[i, g] = -np.sort(-pool, axis=-1)  # descending per head (or pool)
            mask = np.asarray(projection.hard_mask(logits, w, spec))
            counts[i, g] = int(mask.sum(-1).max() if balanced else mask.sum())
    step = max(spec.multiple, 1) if balanced else 1

    def widths_of(i):
        return tuple(counts[i, g] / heads[i, g] for g in _GROUPS)

    geometry = arch.geometry()

    def block(i, w):
        return macs.block_macs(arch.blocks[i], geometry[i], arch.kernel_size, w)

    budget = target * macs.model_macs(arch)
    total = macs.model_macs(arch, [widths_of(i) for i in range(len(arch.blocks))])
    while total > budget:
        best, best_cost, best_saving = None, np.inf, 0.0
        for (i, g), k in counts.items():
            if k - step < projection.min_count(spec, widths[i, g]) * heads[i, g]:
                continue
            w = list(widths_of(i))
            now = block(i, tuple(w))
            w[_GROUPS.index(g)] = (k - step) / heads[i, g]
            saving = now - block(i, tuple(w))
            cost = scores[i, g][:, k - step : k].sum() / max(saving, 1e-9)
            if cost < best_cost:
                best, best_cost, best_saving = (i, g), cost, saving
        if best is None:
            raise ValueError(
                f"cannot reach MACs ratio {target}: every group is at its floor "
                "(search.min_keep, search.min_keep_fraction)"
            )
        counts[best] -= step
        total -= best_saving
    return {
        f"block_{i}": {
            g: projection.fixed_logits(
                projection.keep_top(jnp.asarray(imp[i, g]), counts[i, g], spec)
            )
            for g in _GROUPS
        }
        for i in range(len(arch.blocks))
    }
