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

Here the method's settings and how it plugs into a search; `methods.indicators` starts the
indicators, `methods.budget` holds the cost target.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from amap_jax.methods import projection, similarity
from amap_jax.methods.base import Method, check, register

# What the method is made of, importable from here as before (tests, benches, other methods).
from amap_jax.methods.budget import (  # noqa: F401
    BUDGET,
    SharedAdamState,
    budget_loss,
    budget_optimizer,
    budget_projection,
    channel_costs,
    finalize_indicators,
    hard_ratio,
    hard_widths,
    macs_regularizer,
    scale_by_shared_adam,
    scheduled_target,
    soft_ratio,
    soft_widths,
)
from amap_jax.methods.indicators import (  # noqa: F401
    GROUPS,
    INDICATORS,
    SIMILARITY,
    attention_difference,
    constant_indicators,
    group_shapes,
    init_indicators,
    linear_blocks,
    linear_qk_gradient,
    logits_from_scores,
    mlp_difference,
    qk_gradients,
    relevel_linear_qk,
    weights_only,
)
from amap_jax.methods.projection import PruneSpec
from amap_jax.models.arch import Arch
from amap_jax.train.loop import Hook

# Default indicator rate x search steps: how far (in logits) Adam may move an indicator over a
# search. 12 lands 0.25-epoch and 1-epoch Fashion-MNIST searches within 0.01 of 0.3-0.7
# targets (bench/search_budget.py).
INDICATOR_TRAVEL = 12.0
REWEIGHT = ("v", "hidden")  # sites whose scales fold exactly into the next kernel


def add_reweight(arch: Arch, params) -> dict:
    """Adds reweight scales (init 1: the function is unchanged) to every block."""
    params = dict(params)
    for i, b in enumerate(arch.blocks):
        shapes = group_shapes(b)
        scales = {f"reweight_{g}": jnp.ones(shapes[g]) for g in REWEIGHT}
        params[f"block_{i}"] = {**params[f"block_{i}"], **scales}
    return params


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
    # Per-head minimum as a share of its width: keeps the final MACs fix-up from emptying the
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
        lowest = float(self.cost.ratio(arch, widths))
        check(
            lowest <= self.target,
            f"amap cannot reach {self.cost.label} ratio {self.target}: {lowest:.3f} with every "
            "group at its per-head minimum (amap.min_keep, amap.min_keep_fraction, amap.multiple)",
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
