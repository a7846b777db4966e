"""AS-ViT (Liu, Wu, Guo, "Adaptive Sparse ViT", arXiv 2209.13802): each image keeps the tokens it
needs.

At every pruning point (DeiT-12: before blocks 4, 7 and 10) a token's score (`models.tokens`) is
compared with one learnable threshold. The score is the class token's attention to it in the
block before, summed over heads, each weighted by a per-(head, token) importance: the norm of
that head's attention output (A_h V_h)_j for that token, before the output projection,
normalised over heads (as the paper's official code does, `Attention.forward` of
Cydia2018/AS-ViT; not one weight per head; `model.token_head_weight=residual` takes the norm
after the projection instead). The keep mask is the hard
comparison in the forward pass and a sharp sigmoid of (score - threshold) in the backward pass
(straight-through). Dropped tokens are masked out as keys of every later block while training;
the exported model drops them for real. Loss: CE + budget_weight * |mean MACs / dense MACs -
target|, MACs counting the kept tokens of each image, plus distillation from the dense teacher
(`search.kd_weight`, 0.5 as in the paper's code). The thresholds are their own collection,
trained with Adam and no weight decay. The budget is met as measured, not as trained: at the
end of the search, and again after fine-tuning (which moves the scores), one common shift of
the thresholds, up or down, makes the mean MACs of a calibration batch meet the target.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amap_jax import models
from amap_jax.methods.base import Method, SettingError, check, register
from amap_jax.models import tokens
from amap_jax.pruning import allocate, macs

THRESHOLDS = "thresholds"


def default_points(arch) -> tuple[int, ...]:
    """DeiT-12's points (4, 7, 10) scaled to the depth, after the last linear block."""
    depth = len(arch.blocks)
    linear = [i for i, b in enumerate(arch.blocks) if b.attn == "L"]
    first = linear[-1] + 1 if linear else 1
    pts = {max(first, min(depth - 1, round(depth * f))) for f in (1 / 3, 7 / 12, 5 / 6)}
    return tuple(sorted(p for p in pts if 1 <= p < depth))


def expected_ratio(arch, points, keeps, widths=None, mean=jnp.mean) -> jax.Array:
    """Mean over images of MACs(kept tokens[, channel widths]) / dense MACs, from the [B, N]
    keep masks at the points (straight-through: differentiable). `mean` is over the whole
    batch: under pmap the devices' slices are averaged before the budget is taken."""
    kept = [jnp.sum(k, axis=-1) for k in keeps]
    per_image = macs.model_macs(arch, widths, macs.token_counts(arch, points, kept))
    return mean(per_image) / float(macs.model_macs(arch))


@register
@dataclasses.dataclass(frozen=True)
class AsVit(Method):
    name: ClassVar[str] = "asvit"
    takes_latency: ClassVar[bool] = False  # per-image token counts: no latency model
    section: ClassVar[str] = "asvit"
    trainable: ClassVar[tuple[str, ...]] = (THRESHOLDS,)

    points: tuple[int, ...] = ()  # blocks before which tokens may go; (): DeiT's, scaled
    threshold_init: float = 0.5  # scores are 1 for a uniform class attention
    temperature: float = 0.1  # sharpness of the sigmoid the gradient sees
    threshold_lr: float = 0.01
    budget_weight: float = 2.0
    calibration_batch: int = 256  # images on which the final thresholds meet the target
    # Token counts the exported model's dropping forward is compiled for, one segment per
    # bucket and point (models.tokens.dropping); (): multiples of 8 and the full count, which
    # a list must hold.
    buckets: tuple[int, ...] = ()
    # Parts a batch runs in after each point, sorted by kept count, each at its own bucket
    # (models.tokens.dropping); 0: 1 or 4, whichever the export runs faster at the bench batch.
    groups: int = 0

    def __post_init__(self):
        object.__setattr__(self, "points", tuple(int(p) for p in self.points))
        object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        check(
            all(b >= 1 for b in self.buckets),
            f"asvit.buckets {self.buckets} must be positive token counts",
        )
        check(self.temperature > 0, f"asvit.temperature must be > 0, got {self.temperature}")
        check(self.threshold_lr > 0, f"asvit.threshold_lr must be > 0, got {self.threshold_lr}")
        check(
            self.budget_weight >= 0, f"asvit.budget_weight must be >= 0, got {self.budget_weight}"
        )
        check(self.calibration_batch >= 1, "asvit.calibration_batch must be >= 1")
        check(self.groups >= 0, f"asvit.groups must be >= 0 (0: measured), got {self.groups}")

    def check(self, arch):
        try:
            pts = self.token_points(arch)
        except ValueError as e:
            raise SettingError(f"asvit: {e}") from None
        check(bool(pts), f"asvit: a {len(arch.blocks)}-block model has no pruning point")
        least = macs.model_macs(
            arch, None, macs.token_counts(arch, pts, [arch.num_prefix] * len(pts))
        )
        lowest = least / macs.model_macs(arch)
        check(
            lowest <= self.target,
            f"asvit cannot reach MACs ratio {self.target}: {lowest:.3f} with every patch token "
            "dropped at the first point",
        )
        self.token_buckets(arch)

    # -- model side -------------------------------------------------------------------------

    def token_points(self, arch) -> tuple[int, ...]:
        return tokens.check_points(arch, self.points or default_points(arch))

    def token_buckets(self, arch) -> tuple[int, ...]:
        """The buckets of the exported model (sorted, none above the full token count)."""
        n = arch.num_tokens
        check(
            not self.buckets or max(self.buckets) >= n,
            f"asvit.buckets {self.buckets} cannot hold all {n} tokens of a "
            f"{arch.name or 'ViT'} image: add {n}",
        )
        return tokens.check_buckets(arch, self.buckets or tokens.default_buckets(arch))

    def token_groups(self) -> int:
        return self.groups

    def token_mask(self, gate, k, score):
        theta = gate.variable(THRESHOLDS, f"point_{k}", jnp.full, (), self.threshold_init).value
        soft = jax.nn.sigmoid((score - theta) / self.temperature)
        hard = (score > theta).astype(soft.dtype)
        return hard + (soft - jax.lax.stop_gradient(soft))  # exactly `hard` forward

    def declare(self, block, shapes):
        return {}  # no channel sites

    def block_multipliers(self, variables):
        return {}

    # -- search -----------------------------------------------------------------------------

    def initialize(self, arch, params, *, calibration, seed):
        n = len(self.token_points(arch))
        init = {f"point_{k}": jnp.asarray(self.threshold_init, jnp.float32) for k in range(n)}
        return {"params": params, THRESHOLDS: {"token_gate": init}}

    def optimizers(self, total_steps: int = 0, arch=None):
        return {THRESHOLDS: optax.adam(self.threshold_lr)}

    def loss(self, arch, total_steps: int = 0):
        pts = self.token_points(arch)

        def budget(trainable, reports=None, batch_mean=jnp.mean, step=None):
            ratio = expected_ratio(arch, pts, reports["token_gate"]["keep"], mean=batch_mean)
            return self.budget_weight * jnp.abs(ratio - self.target), {"macs_ratio": ratio}

        return budget

    def progress(self, arch, variables):
        th = variables[THRESHOLDS]["token_gate"]
        return {f"threshold_{k}": float(v) for k, v in sorted(th.items())}

    def finalize(self, arch, variables, calibration=None):
        if calibration is None:
            return variables
        return {**variables, THRESHOLDS: calibrate(self, arch, variables, calibration)}

    def search_ratio(self, arch, variables, calibration=None):
        return search_ratio(self, arch, variables, calibration)

    def recalibrate(self, arch, p_arch, params, calibration):
        return recalibrate(self, arch, p_arch, params, calibration)

    # -- export -----------------------------------------------------------------------------

    def export(self, arch, variables):
        p_arch, p_params = super().export(arch, variables)
        return token_export(self, arch, p_arch, p_params, variables)


def search_ratio(method, arch, variables, calibration) -> float | None:
    """Mean MACs ratio of the search's own thresholds (and channel masks) on the calibration
    batch."""
    if calibration is None:
        return None
    images = calibration(method.calibration_batch).images
    model = models.build(arch, sites=method)
    widths = method.channel_widths(arch, variables) if hasattr(method, "channel_widths") else None
    _, reports = jax.jit(lambda v, x: model.apply(v, x, mutable=[tokens.REPORTS]))(
        variables, images
    )
    keeps = reports[tokens.REPORTS]["token_gate"]["keep"]
    return float(expected_ratio(arch, method.token_points(arch), keeps, widths))


def thresholds_of(variables) -> np.ndarray:
    th = variables[THRESHOLDS]["token_gate"]
    return np.asarray([th[f"point_{k}"] for k in range(len(th))], np.float32)


def token_export(method, arch, p_arch, p_params, variables):
    """The exported model drops tokens itself: its points, buckets, parts (0: measured by the
    pipeline's export) and thresholds become architecture and parameters."""
    p_arch = p_arch.replace(
        token_points=method.token_points(arch),
        token_buckets=method.token_buckets(arch),
        token_groups=method.token_groups(),
    )
    return p_arch, {**p_params, "token_gate": {"thresholds": thresholds_of(variables)}}


def shift_to_target(ratio, target: float) -> float:
    """The common threshold shift at which `ratio(shift)` (a mean MACs ratio, falling as the
    shift rises) meets `target`: bisection in either direction, to the smallest shift whose
    ratio is at or under the target (or, if even every token kept stays under it, the shift
    that keeps them all)."""
    if float(ratio(0.0)) > target:
        lo, hi = 0.0, 1.0
        while float(ratio(hi)) > target and hi < 1e4:
            lo, hi = hi, hi * 2
    else:
        lo, hi = -1.0, 0.0
        while float(ratio(lo)) <= target:
            if lo < -1e4:  # every token kept and still under the target: keep them all
                return lo
            lo, hi = lo * 2, lo
    # The bisection ends where a score meets its threshold; a margin keeps rounding (another
    # compilation of the same forward) from putting that token back.
    return allocate.lowest(ratio, target, lo, hi, steps=30) + 1e-3


def calibrate(method, arch, variables, calibration) -> dict:
    """Thresholds shifted by one common amount so that the mean MACs of a calibration batch
    meet the target, up or down."""
    images = calibration(method.calibration_batch).images
    model = models.build(arch, sites=method)
    pts = method.token_points(arch)
    widths = method.channel_widths(arch, variables) if hasattr(method, "channel_widths") else None

    @jax.jit
    def ratio(shift):
        th = jax.tree.map(lambda t: t + shift, variables[THRESHOLDS])
        _, reports = model.apply({**variables, THRESHOLDS: th}, images, mutable=[tokens.REPORTS])
        return expected_ratio(arch, pts, reports[tokens.REPORTS]["token_gate"]["keep"], widths)

    shift = shift_to_target(ratio, method.target)
    return jax.tree.map(lambda t: np.float32(t + shift), variables[THRESHOLDS])


def exported_ratio(arch, p_arch, params, images, shift=0.0):
    """Mean MACs ratio (against the dense `arch`) of an exported token-dropping model on
    `images`, its thresholds shifted by `shift`."""
    model = models.build(p_arch)
    gate = params["token_gate"]
    shifted = {**params, "token_gate": {**gate, "thresholds": gate["thresholds"] + shift}}
    _, reports = model.apply({"params": shifted}, images, mutable=[tokens.REPORTS])
    keeps = reports[tokens.REPORTS]["token_gate"]["keep"]
    kept = [jnp.sum(k, axis=-1) for k in keeps]
    per_image = macs.model_macs(p_arch, None, macs.token_counts(p_arch, p_arch.token_points, kept))
    return jnp.mean(per_image) / float(macs.model_macs(arch))


def recalibrate(method, arch, p_arch, params, calibration):
    """The exported model's thresholds shifted so that its mean MACs on a calibration batch
    meet the target again: fine-tuning moves the scores, and with them the kept tokens."""
    images = calibration(method.calibration_batch).images
    ratio = jax.jit(lambda shift: exported_ratio(arch, p_arch, params, images, shift))
    shift = shift_to_target(ratio, method.target)
    gate = params["token_gate"]
    thresholds = np.asarray(gate["thresholds"], np.float32) + np.float32(shift)
    return {**params, "token_gate": {**gate, "thresholds": thresholds}}
