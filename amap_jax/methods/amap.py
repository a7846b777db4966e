"""AMAP: indicators, similarity weights, head-balanced masks, reweighting, a MACs target.

Sites: `qk`, `v` and `hidden`. Collections: `indicators` (logits, trained with Adam),
`similarity` (channel-similarity weights, refreshed from the weights every few steps) and, with
`reweight`, per-channel scales `reweight_v` / `reweight_hidden` in `params` (trained with the
weights, folded by export). The multiplier at a site is the head-balanced binary mask (straight-
through gradients into the indicators) times the reweight scales.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from amap_jax import models
from amap_jax.methods import projection, similarity
from amap_jax.methods.base import Method, check
from amap_jax.methods.projection import PruneSpec
from amap_jax.models.arch import LINEAR, Arch
from amap_jax.pruning import macs
from amap_jax.train.loop import Hook

INDICATORS = "indicators"
SIMILARITY = "similarity"
GROUPS = ("qk", "v", "hidden")
REWEIGHT = ("v", "hidden")  # sites whose scales fold exactly into the next kernel


def group_shapes(block) -> dict[str, tuple[int, int]]:
    """AMAP's channel groups of a block as [heads, width]; the MLP is one 'head'."""
    shapes = models.site_shapes(block, 0)
    return {g: shapes[g] for g in GROUPS}


def add_reweight(arch: Arch, params) -> dict:
    """Adds reweight scales (init 1: the function is unchanged) to every block."""
    params = dict(params)
    for i, b in enumerate(arch.blocks):
        shapes = group_shapes(b)
        scales = {f"reweight_{g}": jnp.ones(shapes[g]) for g in REWEIGHT}
        params[f"block_{i}"] = {**params[f"block_{i}"], **scales}
    return params


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


def init_indicators(arch: Arch, params, method: Amap, calib_images=None):
    """Indicator logits: constant, or from attention differences where measured."""
    ind = constant_indicators(arch, method.init_logit)
    if method.init == "constant":
        return ind
    if calib_images is None:
        raise ValueError("attn_diff initialisation needs a calibration batch")
    diffs = attention_difference(arch, params, calib_images, softmax_too=method.init_on_softmax)
    for blk, groups in diffs.items():
        for g, d in groups.items():
            ind[blk][g] = logits_from_scores(d, method.init_logit, method.init_spread)
    return ind


def soft_widths(arch: Arch, indicators) -> list[tuple]:
    """Expected per-head widths: sum of keep-probabilities over a group, divided by its heads."""
    out = []
    for i, block in enumerate(arch.blocks):
        ind = indicators[f"block_{i}"]
        out.append(
            tuple(
                jnp.sum(jax.nn.sigmoid(ind[g])) / (block.heads if g != "hidden" else 1)
                for g in GROUPS
            )
        )
    return out


def soft_ratio(arch: Arch, indicators) -> jax.Array:
    """Differentiable MACs(indicators) / MACs(dense)."""
    return macs.model_macs(arch, soft_widths(arch, indicators)) / float(macs.model_macs(arch))


def macs_regularizer(arch: Arch, target: float, weight: float, kind: str = "square"):
    """`trainable -> (loss, metrics)`: weight * (MACs_soft / MACs_dense - target)^2 (or hinge)."""

    def reg(trainable, reports=None, batch_mean=None):
        ratio = soft_ratio(arch, trainable[INDICATORS])
        gap = ratio - target
        if kind == "hinge":
            gap = jax.nn.relu(gap)
        return weight * gap**2, {"macs_ratio": ratio}

    return reg


def hard_widths(arch: Arch, variables, spec: PruneSpec) -> list[tuple[int, int, int]]:
    """Per-head widths the masks keep now (the mean over heads without head balancing)."""
    ind = variables[INDICATORS]
    return [
        tuple(int(projection.keep_count(ind[f"block_{i}"][g], spec)) for g in GROUPS)
        for i in range(len(arch.blocks))
    ]


def hard_ratio(arch: Arch, variables, spec: PruneSpec) -> float:
    return float(macs.model_macs(arch, hard_widths(arch, variables, spec)) / macs.model_macs(arch))


def finalize_indicators(arch: Arch, variables, spec: PruneSpec, target: float, tokens=None):
    """Fixed indicator logits whose masks meet `target` MACs ratio (with `tokens` per block
    where token pruning keeps fewer than all).

    Starts from the masks the search ended with and, while the hard MACs are over the target,
    removes channels (one per head at a time) where the least importance is lost per MAC saved.
    Without head balancing a layer is one pool of channels whose MACs count as its mean
    per-head width; the export then pads to the widest head, which costs more than that.
    """
    ind, sim = variables[INDICATORS], variables.get(SIMILARITY)
    balanced = spec.head_balanced
    imp, scores, counts, heads, widths = {}, {}, {}, {}, {}
    for i in range(len(arch.blocks)):
        for g in GROUPS:
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
        return tuple(counts[i, g] / heads[i, g] for g in GROUPS)

    geometry = arch.geometry()

    def block(i, w):
        n = None if tokens is None else tokens[i]
        return macs.block_macs(arch.blocks[i], geometry[i], arch.kernel_size, w, n)

    budget = target * macs.model_macs(arch)
    total = macs.model_macs(arch, [widths_of(i) for i in range(len(arch.blocks))], tokens)
    while total > budget:
        best, best_cost, best_saving = None, np.inf, 0.0
        for (i, g), k in counts.items():
            if k - step < projection.min_count(spec, widths[i, g]) * heads[i, g]:
                continue
            w = list(widths_of(i))
            now = block(i, tuple(w))
            w[GROUPS.index(g)] = (k - step) / heads[i, g]
            saving = now - block(i, tuple(w))
            cost = scores[i, g][:, k - step : k].sum() / max(saving, 1e-9)
            if cost < best_cost:
                best, best_cost, best_saving = (i, g), cost, saving
        if best is None:
            raise ValueError(
                f"cannot reach MACs ratio {target}: every group is at its floor "
                "(amap.min_keep, amap.min_keep_fraction)"
            )
        counts[best] -= step
        total -= best_saving
    return {
        f"block_{i}": {
            g: projection.fixed_logits(
                projection.keep_top(jnp.asarray(imp[i, g]), counts[i, g], spec)
            )
            for g in GROUPS
        }
        for i in range(len(arch.blocks))
    }


@dataclasses.dataclass(frozen=True)
class Amap(Method):
    """Automatic multi-head attention pruning (see the module docstring)."""

    name: ClassVar[str] = "amap"
    section: ClassVar[str] = "amap"
    trainable: ClassVar[tuple[str, ...]] = (INDICATORS,)
    indicator_lr: float = 0.05
    macs_weight: float = 20.0
    macs_loss: str = "square"  # or "hinge"
    similarity: bool = True
    similarity_every: int = 50  # steps between refreshes of the similarity weights
    head_balanced: bool = True
    reweight: bool = True
    init: str = "attn_diff"  # or "constant"
    init_on_softmax: bool = False  # the attention-difference rule on softmax blocks too
    init_logit: float = 5.0
    init_spread: float = 1.0
    calibration_batch: int = 64
    min_keep: int = 1
    # Floor per head as a share of its width: keeps the final MACs fix-up from emptying the
    # layers with the most MACs per channel when a short search left importances flat.
    min_keep_fraction: float = 0.0
    multiple: int = 1  # kept widths rounded up to a multiple (hardware-friendly matmuls)

    @property
    def spec(self) -> PruneSpec:
        return PruneSpec(self.min_keep, self.min_keep_fraction, self.multiple, self.head_balanced)

    def __post_init__(self):
        c = self
        check(
            c.init in ("constant", "attn_diff"),
            f"amap.init must be 'constant' or 'attn_diff', got {c.init!r}",
        )
        check(
            c.macs_loss in ("square", "hinge"),
            f"amap.macs_loss must be 'square' or 'hinge', got {c.macs_loss!r}",
        )
        check(c.min_keep >= 1 and c.multiple >= 1, "amap.min_keep and amap.multiple must be >= 1")
        check(
            0.0 <= c.min_keep_fraction <= 1.0,
            f"amap.min_keep_fraction must be in [0, 1], got {c.min_keep_fraction}",
        )
        check(
            c.similarity_every >= 1, f"amap.similarity_every must be >= 1, got {c.similarity_every}"
        )
        check(c.indicator_lr > 0, f"amap.indicator_lr must be > 0, got {c.indicator_lr}")
        check(
            c.calibration_batch >= 1,
            f"amap.calibration_batch must be >= 1, got {c.calibration_batch}",
        )

    def check(self, arch):
        spec = self.spec

        def least(width):
            k = projection.min_count(spec, width)
            return min(-(-k // spec.multiple) * spec.multiple, width)

        widths = [(least(b.qk_dim), least(b.v_dim), least(b.mlp_dim)) for b in arch.blocks]
        floor = macs.model_macs(arch, widths) / macs.model_macs(arch)
        check(
            floor <= self.target,
            f"amap cannot reach MACs ratio {self.target}: {floor:.3f} with every group at its "
            "floor (amap.min_keep, amap.min_keep_fraction, amap.multiple)",
        )

    def declare(self, block: nn.Module, shapes):
        variables = {INDICATORS: {}, SIMILARITY: {}, "params": {}}
        for g in GROUPS:
            shape = shapes[g]
            init = lambda s=shape: jnp.full(s, self.init_logit, jnp.float32)  # noqa: E731
            variables[INDICATORS][g] = block.variable(INDICATORS, g, init).value
            if block.is_initializing() or block.has_variable(SIMILARITY, g):  # optional at apply
                variables[SIMILARITY][g] = block.variable(SIMILARITY, g, jnp.ones, shape).value
        if self.reweight:
            for g in REWEIGHT:
                name = f"reweight_{g}"
                variables["params"][name] = block.param(name, nn.initializers.ones, shapes[g])
        return self.block_multipliers(variables)

    def block_multipliers(self, variables):
        ind, sim = variables[INDICATORS], variables.get(SIMILARITY, {})
        params = variables.get("params", {})
        out = {}
        for g in GROUPS:
            m = projection.mask(ind[g], sim.get(g), self.spec)
            r = params.get(f"reweight_{g}")
            out[g] = m if r is None else m * r
        return out

    def initialize(self, arch, params, *, calibration, seed):
        calib = calibration(self.calibration_batch) if self.init == "attn_diff" else None
        indicators = init_indicators(arch, params, self, calib)
        sim = (
            similarity.similarity_weights(arch, params)
            if self.similarity
            else constant_indicators(arch, 1.0)
        )
        params = add_reweight(arch, params) if self.reweight else params
        return {"params": params, INDICATORS: indicators, SIMILARITY: sim}

    def optimizers(self, total_steps: int = 0):
        return {INDICATORS: optax.adam(self.indicator_lr)}

    def loss(self, arch):
        return macs_regularizer(arch, self.target, self.macs_weight, self.macs_loss)

    def hooks(self, arch):
        if not self.similarity:
            return ()
        sim_fn = lambda p: similarity.similarity_weights(arch, p)  # noqa: E731
        refresh = jax.jit(
            lambda st: st.replace(extra={**st.extra, SIMILARITY: sim_fn(st.trainable["params"])})
        )
        return (Hook(self.similarity_every, refresh),)

    def finalize(self, arch, variables, calibration=None):
        fixed = finalize_indicators(arch, variables, self.spec, self.target)
        return {**variables, INDICATORS: fixed}
