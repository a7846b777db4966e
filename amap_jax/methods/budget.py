"""AMAP's cost target: soft widths and ratios of the indicators, the projection that keeps the
search on its aim every step, the indicators' shared-moment Adam, the Lagrange and penalty
alternatives, and the trim of the last channels at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amap_jax.methods import projection
from amap_jax.methods.indicators import (
    GROUPS,
    INDICATORS,
    SIMILARITY,
    constant_indicators,
    linear_blocks,
)
from amap_jax.methods.projection import PruneSpec
from amap_jax.models.arch import Arch
from amap_jax.pruning import allocate, macs, widths
from amap_jax.pruning import cost as cost_lib

BUDGET = "budget"  # the Lagrange multiplier of the MACs constraint (budget="lagrange")


def soft_widths(arch: Arch, indicators, head_balanced: bool = True) -> list[tuple]:
    """Expected per-head widths: the sum of keep-probabilities over a group, divided by its
    heads; without head balancing the widest head's sum (export pads every head to it)."""
    out = []
    for i in range(len(arch.blocks)):
        ind = indicators[f"block_{i}"]
        widths = []
        for g in GROUPS:
            p = jax.nn.sigmoid(ind[g])
            if head_balanced:
                widths.append(jnp.sum(p) / p.shape[0])
            else:
                widths.append(jnp.max(jnp.sum(p, axis=-1)))
        out.append(tuple(widths))
    return out


def soft_ratio(
    arch: Arch, indicators, head_balanced: bool = True, cost: cost_lib.Cost = cost_lib.MACS
) -> jax.Array:
    """Differentiable cost(indicators) / cost(dense)."""
    return cost.ratio(arch, soft_widths(arch, indicators, head_balanced))


def scheduled_target(target: float, step, total_steps: int, ramp: float):
    """The MACs ratio the search aims at at `step`: from 1 down to `target` over the first
    `ramp` share of the search, then `target` (ramp 0: `target` from the start)."""
    if ramp <= 0 or not total_steps or step is None:
        return target
    done = jnp.minimum(jnp.asarray(step, jnp.float32) / (ramp * total_steps), 1.0)
    return 1.0 - (1.0 - target) * done


def budget_loss(ratio, aim, trainable, weight: float, kind: str = "square", cost: str = "macs"):
    """weight * (ratio - aim)^2 (hinge: only above it), plus, where the trainable tree holds a
    Lagrange multiplier (BUDGET), multiplier * (ratio - aim): its optimizer ascends, so the
    multiplier grows while the ratio is over the aim and the constraint holds at the end
    whatever the classification loss pulls (dual ascent)."""
    gap = ratio - aim
    loss = weight * (jax.nn.relu(gap) if kind == "hinge" else gap) ** 2
    metrics = {f"{cost}_ratio": ratio, f"{cost}_aim": aim}
    if BUDGET in trainable:
        multiplier = trainable[BUDGET]["multiplier"]
        loss = loss + multiplier * gap
        metrics["multiplier"] = multiplier
    return loss, metrics


def macs_regularizer(
    arch: Arch,
    target: float,
    weight: float,
    kind: str = "square",
    total_steps: int = 0,
    ramp: float = 0.0,
    head_balanced: bool = True,
    cost: cost_lib.Cost = cost_lib.MACS,
):
    """`(trainable, reports, batch_mean, step) -> (loss, metrics)`: the budget loss of the
    soft cost ratio against the (scheduled) target."""

    def reg(trainable, reports=None, batch_mean=None, step=None):
        ratio = soft_ratio(arch, trainable[INDICATORS], head_balanced, cost)
        aim = scheduled_target(target, step, total_steps, ramp)
        return budget_loss(ratio, aim, trainable, weight, kind, cost.kind)

    return reg


def budget_optimizer(lr: float) -> optax.GradientTransformation:
    """Gradient ascent on the Lagrange multiplier (its gradient is ratio - aim)."""
    return optax.sgd(-lr)


class SharedAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: jax.Array  # one second moment for the whole tree


def scale_by_shared_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """Adam with one second moment for all indicators (the mean square gradient) instead of one
    per indicator. Per-indicator Adam moves every channel about as far, whatever the size of its
    gradient: a channel the loss hardly sees (the q/k channels of linear attention, whose output
    does not change when q is scaled) travels as far as one it depends on, in the direction its
    noise points. With the shared moment a step keeps the size of its gradient relative to the
    others."""

    def init_fn(params):
        mu = jax.tree.map(jnp.zeros_like, params)
        return SharedAdamState(jnp.zeros([], jnp.int32), mu, jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        leaves = jax.tree.leaves(updates)
        size = sum(x.size for x in leaves)
        mean_square = sum(jnp.sum(jnp.square(x)) for x in leaves) / max(size, 1)
        nu = b2 * state.nu + (1 - b2) * mean_square
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        scale = jnp.sqrt(nu / (1 - b2**count)) + eps
        return jax.tree.map(lambda m: m / scale, mu_hat), SharedAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def channel_costs(arch: Arch, head_balanced: bool = True, cost: cost_lib.Cost = cost_lib.MACS):
    """Per indicator, what its channel costs (d soft ratio / d keep-probability with every
    channel kept), divided by the mean over all: the direction the projection shifts along."""
    full = constant_indicators(arch, 0.0)
    ones = jax.tree.map(jnp.ones_like, full)

    def ratio_of_p(p):
        logits = jax.tree.map(lambda x: jnp.log(x) - jnp.log1p(-x + 1e-7), p)
        return soft_ratio(arch, logits, head_balanced, cost)

    grads = jax.grad(ratio_of_p)(jax.tree.map(lambda x: x * (1 - 1e-6), ones))
    mean = jnp.mean(jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grads)]))
    return jax.tree.map(lambda g: g / mean, grads)


def budget_projection(
    arch: Arch,
    target: float,
    total_steps: int,
    ramp: float,
    head_balanced: bool = True,
    iterations: int = 40,
    shift: str = "uniform",
    exempt_linear_qk: bool = False,
    cost: cost_lib.Cost = cost_lib.MACS,
) -> optax.GradientTransformation:
    """Appended to the indicators' optimizer: after each update, every logit moves by the same
    delta (`shift="uniform"`) or by delta x its channel's cost (`"cost"`, `channel_costs`),
    delta found by bisection so that the soft cost ratio equals this step's aim
    (`scheduled_target`). The budget then holds at every step, however short the search, with
    no multiplier to wind up. With the uniform shift the logits alone (their start and what the
    classification loss did to them) decide which channels carry the budget; the cost-weighted
    shift empties the groups with the most MACs per channel first, whatever their importance
    (on FLatten at 0.5 MACs it left 4-5 of 16 q/k channels in the linear blocks and lost 4
    points of top-1 against the Lagrange multiplier: bench/search_budget.py). With
    `exempt_linear_qk` the q/k logits of linear attention do not move: the other groups carry
    the budget (`amap.linear_qk=exempt`)."""
    costs = channel_costs(arch, head_balanced, cost)
    if shift == "uniform":
        costs = jax.tree.map(jnp.ones_like, costs)
    if exempt_linear_qk:
        for i in linear_blocks(arch):
            c = costs[f"block_{i}"]
            costs[f"block_{i}"] = {**c, "qk": jnp.zeros_like(c["qk"])}

    def init_fn(params):
        del params
        return {"count": jnp.zeros([], jnp.int32)}

    def update_fn(updates, state, params=None):
        count = state["count"] + 1
        aim = scheduled_target(target, count, total_steps, ramp)
        new = jax.tree.map(jnp.add, params[INDICATORS], updates[INDICATORS])

        def ratio(delta):
            moved = jax.tree.map(lambda x, c: x + delta * c, new, costs)
            return soft_ratio(arch, moved, head_balanced, cost)

        delta = allocate.traced_level(ratio, aim, -60.0, 60.0, iterations)
        moved = jax.tree.map(lambda u, c: u + delta * c, updates[INDICATORS], costs)
        return {**updates, INDICATORS: moved}, {"count": count}

    return optax.GradientTransformation(init_fn, update_fn)


def hard_widths(arch: Arch, variables, spec: PruneSpec) -> list[tuple[int, int, int]]:
    """Per-head widths the masks keep now (the mean over heads without head balancing)."""
    ind = variables[INDICATORS]
    return [
        tuple(int(projection.keep_count(ind[f"block_{i}"][g], spec)) for g in GROUPS)
        for i in range(len(arch.blocks))
    ]


def hard_ratio(arch: Arch, variables, spec: PruneSpec) -> float:
    return float(macs.model_macs(arch, hard_widths(arch, variables, spec)) / macs.model_macs(arch))


def finalize_indicators(
    arch: Arch,
    variables,
    spec: PruneSpec,
    target: float,
    tokens=None,
    cost: cost_lib.Cost = cost_lib.MACS,
):
    """Fixed indicator logits whose masks meet `target` cost ratio (with `tokens` per block
    where token pruning keeps fewer than all): the masks the search ended with, trimmed where
    the least importance is lost per unit of cost saved (`pruning.widths.at_target`) while
    their cost is over the target. The search decides the widths; this only trims its last channels
    (the run reports how many, `budget.fixup`)."""
    ind, sim = variables[INDICATORS], variables.get(SIMILARITY)
    scores, start = [], []
    for i in range(len(arch.blocks)):
        block_scores, block_start = {}, {}
        for g in GROUPS:
            logits = ind[f"block_{i}"][g]
            w = None if sim is None else sim[f"block_{i}"][g]
            block_scores[g] = np.asarray(projection.importance(logits, w))
            kept = np.asarray(projection.hard_mask(logits, w, spec)).sum(-1).astype(int)
            block_start[g] = int(kept.max()) if spec.head_balanced else kept
        scores.append(block_scores)
        start.append(block_start)
    try:
        plan = widths.at_target(
            arch,
            scores,
            target,
            start=start,
            minimum=lambda site, width: projection.min_count(spec, width),
            multiple=spec.multiple if spec.head_balanced else 1,
            balanced=spec.head_balanced,
            tokens=tokens,
            cost=cost,
        )
    except ValueError:
        raise ValueError(
            f"cannot reach {cost.label} ratio {target}: every group is at its per-head minimum "
            "(amap.min_keep, amap.min_keep_fraction)"
        ) from None
    masks = plan.masks(scores)
    return {
        f"block_{i}": {g: projection.fixed_logits(jnp.asarray(m[g])) for g in GROUPS}
        for i, m in enumerate(masks)
    }
