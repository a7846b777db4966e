"""AMAP: indicators, similarity weights, head-balanced masks, reweighting, a cost target.

Sites: `qk`, `v` and `hidden`. Collections: `indicators` (logits, trained with Adam),
`similarity` (channel-similarity weights, refreshed from the weights every few steps) and, with
`reweight`, per-channel scales `reweight_v` / `reweight_hidden` in `params` (trained with the
weights, folded by export). The multiplier at a site is the head-balanced binary mask (straight-
through gradients into the indicators) times the reweight scales.

The search itself lands on the target: after every update all indicators move by one shared
delta until the soft cost ratio (MACs, or the latency model's: `pruning.cost`) is on an aim
that falls from 1 to the target over the first `target_ramp` of the search
(`budget_projection`); the classification loss, through the straight-through masks, decides
which channels carry the budget. The indicators' Adam has one
second moment for all of them (`scale_by_shared_adam`) and its rate scales with the search's
length (`indicator_lr=0`). What is left for `finalize`
is trimming the last channels (`budget.fixup` in the summary). The alternatives measured on the
way (`bench/search_budget.py`): a Lagrange multiplier trained by dual ascent (`budget=lagrange`,
which winds up and overshoots in short searches) and the plain penalty (`budget=penalty`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from amap_jax import models
from amap_jax.methods import projection, similarity
from amap_jax.methods.base import Method, check, register
from amap_jax.methods.projection import PruneSpec
from amap_jax.models.arch import LINEAR, Arch
from amap_jax.pruning import allocate, macs, widths
from amap_jax.pruning import cost as cost_lib
from amap_jax.train.loop import Hook

INDICATORS = "indicators"
SIMILARITY = "similarity"
BUDGET = "budget"  # the Lagrange multiplier of the MACs constraint (budget="lagrange")
# Default indicator rate x search steps: how far (in logits) Adam may move an indicator over a
# search. 12 lands 0.25-epoch and 1-epoch Fashion-MNIST searches within 0.01 of 0.3-0.7
# targets (bench/search_budget.py).
INDICATOR_TRAVEL = 12.0
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


def mlp_difference(arch: Arch, params, images):
    """Per block, relative change of the MLP output when one hidden unit is removed:
    {'block_i': {'hidden': [1, F]}}. Removing unit c takes h_c * fc2[c] off the output, so
    ||change||_F = ||h_c||_2 * ||fc2[c]||_2 in closed form, per image, over its ||output||_F."""
    _, inter = models.build(arch).apply({"params": params}, images, mutable=["intermediates"])
    out = {}
    for i in range(len(arch.blocks)):
        mlp = params[f"block_{i}"]["mlp"]
        y = inter["intermediates"][f"block_{i}"]["mlp_input"][0]
        h = y @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]
        h = jax.nn.gelu(h, approximate=arch.gelu_approximate)
        o = h @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
        h_norm = jnp.sqrt(jnp.sum(h.reshape(h.shape[0], -1, h.shape[-1]) ** 2, axis=1))  # [B, F]
        change = h_norm * jnp.linalg.norm(mlp["fc2"]["kernel"], axis=-1)  # [B, F]
        o_norm = jnp.linalg.norm(o.reshape(o.shape[0], -1), axis=-1)[:, None] + 1e-12
        out[f"block_{i}"] = {"hidden": jnp.mean(change / o_norm, axis=0)[None]}
    return out


def logits_from_scores(scores: jax.Array, base: float, spread: float) -> jax.Array:
    """Initial logits rising with the score: base + spread * z-score over the group."""
    z = (scores - scores.mean()) / (scores.std() + 1e-12)
    return base + spread * z


def init_indicators(arch: Arch, params, method: Amap, calib_images=None):
    """Indicator logits: constant, or rising with how much removing the channel changes its
    layer's output, where measured (`init`: attention differences of linear attention, of
    softmax too with `init_on_softmax`; `output_diff`: of every attention and MLP)."""
    ind = constant_indicators(arch, method.init_logit)
    if method.init == "constant":
        return ind
    if calib_images is None:
        raise ValueError(f"{method.init} initialisation needs a calibration batch")
    everywhere = method.init == "output_diff"
    diffs = attention_difference(
        arch, params, calib_images, softmax_too=method.init_on_softmax or everywhere
    )
    if everywhere:
        for blk, groups in mlp_difference(arch, params, calib_images).items():
            diffs.setdefault(blk, {}).update(groups)
    for blk, groups in diffs.items():
        for g, d in groups.items():
            ind[blk][g] = logits_from_scores(d, method.init_logit, method.init_spread)
    return ind


def linear_blocks(arch: Arch) -> list[int]:
    return [i for i, b in enumerate(arch.blocks) if b.attn == LINEAR]


def weights_only(params) -> dict:
    """The model's own weights out of a search's `params` (without its reweight scales)."""
    return {
        k: (
            {n: x for n, x in v.items() if not n.startswith("reweight_")}
            if k.startswith("block_")
            else v
        )
        for k, v in params.items()
    }


def relevel_linear_qk(arch: Arch, params, indicators, images):
    """Linear attention's q/k indicators set from how much each channel changes its block.

    A focused linear block computes the same output when all its q (or k) channels are scaled
    together, so the loss gradients of its q/k multipliers sum to zero: the loss never says how
    many to keep. Its value channels have no such invariance; their indicators carry the
    loss's verdict. Both groups are measured in one currency, the relative change of the
    block's attention output when the channel is removed (`attention_difference`, the
    paper's signal), and each q/k channel gets the indicator a value channel of the same
    block with the same change has (quantile matching of the two groups; a sliver of the
    q/k change's z-score breaks ties, so the order of the q/k channels is the order of their
    changes). Blocks without linear attention are returned unchanged."""
    diffs = attention_difference(arch, weights_only(params), images)
    out = dict(indicators)
    for blk, d in diffs.items():
        v_logits = jnp.sort(indicators[blk]["v"].ravel())
        v_diffs = jnp.sort(d["v"].ravel())
        qk = jnp.interp(d["qk"], v_diffs, v_logits)
        z = (d["qk"] - d["qk"].mean()) / (d["qk"].std() + 1e-12)
        out[blk] = {**indicators[blk], "qk": qk + 1e-3 * z}
    return out


def qk_gradients(arch: Arch, params, indicators, images, method) -> dict:
    """Per block, the loss gradients of its q/k indicators (through the straight-through
    masks, on `images` with their argmax as labels). For tests and probes."""
    model = models.build(arch, sites=method)

    def loss(ind):
        logits = model.apply({"params": params, INDICATORS: ind}, images)
        labels = jax.lax.stop_gradient(jnp.argmax(logits, -1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss)(indicators)
    return {blk: g["qk"] for blk, g in grads.items()}


def linear_qk_gradient(arch: Arch, params, indicators, images, method) -> dict:
    """Per linear block, the sum of its q/k indicators' loss gradients (`qk_gradients`): ~0,
    the scale invariance `relevel_linear_qk` works around."""
    grads = qk_gradients(arch, params, indicators, images, method)
    return {f"block_{i}": float(jnp.sum(grads[f"block_{i}"])) for i in linear_blocks(arch)}


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
            floor=lambda site, width: projection.min_count(spec, width),
            multiple=spec.multiple if spec.head_balanced else 1,
            balanced=spec.head_balanced,
            tokens=tokens,
            cost=cost,
        )
    except ValueError:
        raise ValueError(
            f"cannot reach {cost.label} ratio {target}: every group is at its floor "
            "(amap.min_keep, amap.min_keep_fraction)"
        ) from None
    masks = plan.masks(scores)
    return {
        f"block_{i}": {g: projection.fixed_logits(jnp.asarray(m[g])) for g in GROUPS}
        for i, m in enumerate(masks)
    }


@register
@dataclasses.dataclass(frozen=True)
class Amap(Method):
    """Automatic multi-head attention pruning (see the module docstring)."""

    name: ClassVar[str] = "amap"
    section: ClassVar[str] = "amap"
    # Adam's rate for the indicators; 0: INDICATOR_TRAVEL / search steps, so that a short
    # search moves them as far as a long one (and lands on its target too).
    indicator_lr: float = 0.0
    # "cosine": the rate falls to 0 by the end of the search, so the masks settle and the
    # weights adapt to the last ones; "constant".
    indicator_schedule: str = "cosine"
    # The MACs constraint: "projection" (after each update the indicators move along their
    # channels' MACs costs until the soft ratio is on the aim: the search's own masks land on
    # the target, whatever its length), "lagrange" (a multiplier trained by dual ascent plus
    # the square term; short searches overshoot as the multiplier winds up) or "penalty" (the
    # square or hinge term alone, which settles wherever it balances the classification loss).
    budget: str = "projection"
    # How the projection moves the logits: all by the same amount ("uniform") or each in
    # proportion to its channel's MACs cost ("cost").
    budget_shift: str = "uniform"
    # Adam's second moment for the indicators: one for all ("shared", `scale_by_shared_adam`:
    # a channel's step keeps the size of its gradient) or one per indicator ("per_channel").
    # "auto": shared with the projection; per channel with "lagrange" and "penalty", whose
    # MACs term is in the gradient and needs Adam's per-channel normalisation (with a shared
    # moment the multiplier swung Fashion-MNIST FLatten searches to 0.42 for a 0.5 target).
    indicator_moments: str = "auto"
    budget_lr: float = 1.0  # dual ascent rate of the multiplier
    target_ramp: float = 0.25  # share of the search over which the aim falls from 1 to target
    macs_weight: float = 20.0
    macs_loss: str = "square"  # or "hinge" (penalty only)
    similarity: bool = True
    similarity_every: int = 50  # steps between refreshes of the similarity weights
    head_balanced: bool = True
    reweight: bool = True
    # Initial indicators: "output_diff" (how much removing the channel changes its attention's or
    # MLP's output, on a calibration batch), "attn_diff" (attention differences of linear
    # attention only, the paper's rule) or "constant". bench/search_budget.py and
    # bench/compare.py measure them.
    init: str = "output_diff"
    # Linear attention's q/k channels, which the loss gradient cannot size (their block is
    # scale invariant: the gradients of its q/k indicators sum to 0, `linear_qk_gradient`):
    # "exempt" (the budget's shift leaves them, so nothing pushes them out unopposed; the
    # other groups carry the budget), "difference" (every `similarity_every` steps their
    # indicators are set from the attention difference, in the currency of the same block's
    # value channels, `relevel_linear_qk`) or "shift" (like every other group: the budget
    # drains them). Chosen on the validation split: bench.compare --grid linear_qk.
    linear_qk: str = "exempt"
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
            c.init in ("constant", "attn_diff", "output_diff"),
            f"amap.init must be 'constant', 'attn_diff' or 'output_diff', got {c.init!r}",
        )
        check(
            c.linear_qk in ("difference", "exempt", "shift"),
            f"amap.linear_qk must be 'difference', 'exempt' or 'shift', got {c.linear_qk!r}",
        )
        check(
            c.macs_loss in ("square", "hinge"),
            f"amap.macs_loss must be 'square' or 'hinge', got {c.macs_loss!r}",
        )
        check(
            c.budget in ("projection", "lagrange", "penalty"),
            f"amap.budget must be 'projection', 'lagrange' or 'penalty', got {c.budget!r}",
        )
        check(
            not (c.budget != "penalty" and c.macs_loss == "hinge"),
            "amap.macs_loss=hinge is a penalty: use it with amap.budget=penalty",
        )
        check(
            c.budget_shift in ("uniform", "cost"),
            f"amap.budget_shift must be 'uniform' or 'cost', got {c.budget_shift!r}",
        )
        check(
            c.indicator_moments in ("auto", "shared", "per_channel"),
            f"amap.indicator_moments must be 'auto', 'shared' or 'per_channel', got "
            f"{c.indicator_moments!r}",
        )
        check(0 <= c.target_ramp <= 1, f"amap.target_ramp must be in [0, 1], got {c.target_ramp}")
        check(c.budget_lr > 0, f"amap.budget_lr must be > 0, got {c.budget_lr}")
        check(
            c.indicator_schedule in ("cosine", "constant"),
            f"amap.indicator_schedule must be 'cosine' or 'constant', got {c.indicator_schedule!r}",
        )
        check(c.min_keep >= 1 and c.multiple >= 1, "amap.min_keep and amap.multiple must be >= 1")
        check(
            0.0 <= c.min_keep_fraction <= 1.0,
            f"amap.min_keep_fraction must be in [0, 1], got {c.min_keep_fraction}",
        )
        check(
            c.similarity_every >= 1, f"amap.similarity_every must be >= 1, got {c.similarity_every}"
        )
        check(c.indicator_lr >= 0, f"amap.indicator_lr must be >= 0, got {c.indicator_lr}")
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
        floor = float(self.cost.ratio(arch, widths))
        check(
            floor <= self.target,
            f"amap cannot reach {self.cost.label} ratio {self.target}: {floor:.3f} with every "
            "group at its "
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
        calib = calibration(self.calibration_batch).images if self.init != "constant" else None
        indicators = init_indicators(arch, params, self, calib)
        sim = (
            similarity.similarity_weights(arch, params)
            if self.similarity
            else constant_indicators(arch, 1.0)
        )
        params = add_reweight(arch, params) if self.reweight else params
        out = {"params": params, INDICATORS: indicators, SIMILARITY: sim}
        if self.budget == "lagrange":
            out[BUDGET] = {"multiplier": jnp.zeros((), jnp.float32)}
        return out

    @property
    def trainable(self) -> tuple[str, ...]:
        return (INDICATORS, BUDGET) if self.budget == "lagrange" else (INDICATORS,)

    def indicator_optimizer(self, total_steps: int, arch: Arch | None = None):
        rate = self.indicator_rate(total_steps)
        if self.indicator_schedule == "cosine":  # twice the peak: the same travel in all
            rate = optax.cosine_decay_schedule(2 * rate, max(total_steps, 1))
        moments = self.indicator_moments
        if moments == "auto":
            moments = "shared" if self.budget == "projection" else "per_channel"
        if moments == "shared":
            adam = optax.chain(scale_by_shared_adam(), optax.scale_by_learning_rate(rate))
        else:
            adam = optax.adam(rate)
        if self.budget != "projection":
            return adam
        if arch is None:
            raise ValueError("amap.budget=projection needs the architecture")
        project = budget_projection(
            arch,
            self.target,
            total_steps,
            self.target_ramp,
            self.head_balanced,
            shift=self.budget_shift,
            exempt_linear_qk=self.linear_qk == "exempt",
            cost=self.cost,
        )
        return optax.chain(adam, project)

    def indicator_rate(self, total_steps: int) -> float:
        return self.indicator_lr or INDICATOR_TRAVEL / max(total_steps, 1)

    def optimizers(self, total_steps: int = 0, arch: Arch | None = None):
        out = {INDICATORS: self.indicator_optimizer(total_steps, arch)}
        if self.budget == "lagrange":
            out[BUDGET] = budget_optimizer(self.budget_lr)
        return out

    def loss(self, arch, total_steps: int = 0):
        # With the projection the budget holds by construction: the term is there to report.
        return macs_regularizer(
            arch,
            self.target,
            0.0 if self.budget == "projection" else self.macs_weight,
            self.macs_loss,
            total_steps,
            self.target_ramp,
            self.head_balanced,
            self.cost,
        )

    def relevels(self, arch) -> bool:
        return self.linear_qk == "difference" and bool(linear_blocks(arch))

    def hooks(self, arch, calibration=None):
        out = []
        if self.similarity:
            sim_fn = lambda p: similarity.similarity_weights(arch, p)  # noqa: E731
            refresh = jax.jit(
                lambda st: st.replace(
                    extra={**st.extra, SIMILARITY: sim_fn(st.trainable["params"])}
                )
            )
            out.append(Hook(self.similarity_every, refresh))
        if self.relevels(arch):
            if calibration is None:
                raise ValueError("amap.linear_qk=difference needs a calibration batch")
            images = calibration(self.calibration_batch).images

            def relevel(st):
                t = st.trainable
                ind = relevel_linear_qk(arch, t["params"], t[INDICATORS], images)
                return st.replace(trainable={**t, INDICATORS: ind})

            out.append(Hook(self.similarity_every, jax.jit(relevel)))
        return tuple(out)

    def finalize(self, arch, variables, calibration=None):
        fixed = finalize_indicators(arch, variables, self.spec, self.target, cost=self.cost)
        return {**variables, INDICATORS: fixed}
