"""AMAP + AS-ViT: channels by AMAP and tokens by AS-ViT in one model, under one MACs budget that
counts both (channel widths x kept tokens of each image).

Settings: AMAP's in `amap`, AS-ViT's in `asvit`, and `amap_asvit.schedule`: `joint` trains
indicators and thresholds together for the whole search; `channels_first` trains the indicators
in the first half and the thresholds in the second. The budget is AMAP's MACs loss
(`amap.macs_loss`, `amap.macs_weight`) on the mean over images of the joint MACs ratio. At the
end the channels keep the search's masks and the thresholds are shifted together until the mean
MACs of a calibration batch meet the target; only a budget the tokens cannot meet alone (every
patch token dropped) trims channels, with that batch's token counts. Trimming channels first cut
whole heads' q/k in one step (7 of 16 in a block) and took top-1 after the search from ~81% to
40% on the seed whose search ended furthest over (`bench.compare --grid tokens`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from amap_jax import models
from amap_jax.methods import amap as amap_lib
from amap_jax.methods import asvit as asvit_lib
from amap_jax.methods.amap import INDICATORS, Amap
from amap_jax.methods.asvit import THRESHOLDS, AsVit
from amap_jax.methods.base import Method, check, register
from amap_jax.models import tokens
from amap_jax.pruning import macs

_PARTS = {"setting": False}


@register
@dataclasses.dataclass(frozen=True)
class AmapAsVit(Method):
    name: ClassVar[str] = "amap+asvit"
    takes_latency: ClassVar[bool] = False  # per-image token counts: no latency model
    section: ClassVar[str] = "amap_asvit"

    schedule: str = "joint"  # or "channels_first"
    amap: Amap = dataclasses.field(default=Amap(), metadata=_PARTS)
    asvit: AsVit = dataclasses.field(default=AsVit(), metadata=_PARTS)

    def __post_init__(self):
        check(
            self.schedule in ("joint", "channels_first"),
            f"amap_asvit.schedule must be 'joint' or 'channels_first', got {self.schedule!r}",
        )

    @property
    def trainable(self) -> tuple[str, ...]:
        return (*self.channels.trainable, THRESHOLDS)

    @property
    def channels(self) -> Amap:
        """AMAP as the joint budget uses it: the kept tokens of each image enter the MACs, so a
        projection of the indicators alone cannot hold it; the multiplier does (`lagrange`),
        unless AMAP is set to the plain `penalty`."""
        if self.amap.budget == "projection":
            return dataclasses.replace(self.amap, budget="lagrange")
        return self.amap

    @classmethod
    def sections(cls):
        return ("amap_asvit", "amap", "asvit")

    @classmethod
    def from_config(cls, config):
        parts = {p: m.from_config(config) for p, m in (("amap", Amap), ("asvit", AsVit))}
        return cls(target=config.search.target, **dict(config.amap_asvit), **parts)

    def check(self, arch):
        self.asvit.check(arch)

    # -- model side -------------------------------------------------------------------------

    def declare(self, block, shapes):
        return self.amap.declare(block, shapes)

    def block_multipliers(self, variables):
        return self.amap.block_multipliers(variables)

    def token_points(self, arch):
        return self.asvit.token_points(arch)

    def token_buckets(self, arch):
        return self.asvit.token_buckets(arch)

    def token_groups(self):
        return self.asvit.token_groups()

    def token_mask(self, gate, k, score):
        return self.asvit.token_mask(gate, k, score)

    # -- search -----------------------------------------------------------------------------

    def initialize(self, arch, params, *, calibration, seed):
        out = self.channels.initialize(arch, params, calibration=calibration, seed=seed)
        t = self.asvit.initialize(arch, params, calibration=None, seed=seed)
        return {**out, THRESHOLDS: t[THRESHOLDS]}

    def optimizers(self, total_steps: int = 0, arch=None):
        out = self.channels.optimizers(total_steps, arch)
        ind = out[INDICATORS]
        thr = self.asvit.optimizers(total_steps)[THRESHOLDS]
        if self.schedule == "channels_first":
            half = max(total_steps // 2, 1)
            ind = optax.chain(ind, optax.scale_by_schedule(lambda s: (s < half) * 1.0))
            thr = optax.chain(thr, optax.scale_by_schedule(lambda s: (s >= half) * 1.0))
        return {**out, INDICATORS: ind, THRESHOLDS: thr}

    def loss(self, arch, total_steps: int = 0):
        pts, a = self.token_points(arch), self.amap

        def budget(trainable, reports=None, batch_mean=jnp.mean, step=None):
            widths = amap_lib.soft_widths(arch, trainable[INDICATORS], a.head_balanced)
            keeps = reports["token_gate"]["keep"]
            ratio = asvit_lib.expected_ratio(arch, pts, keeps, widths, mean=batch_mean)
            aim = amap_lib.scheduled_target(self.target, step, total_steps, a.target_ramp)
            return amap_lib.budget_loss(ratio, aim, trainable, a.macs_weight, a.macs_loss)

        return budget

    def hooks(self, arch, calibration=None):
        return self.amap.hooks(arch, calibration)

    def progress(self, arch, variables):
        return {**self.amap.progress(arch, variables), **self.asvit.progress(arch, variables)}

    def channel_widths(self, arch, variables):
        return amap_lib.hard_widths(arch, variables, self.amap.spec)

    def finalize(self, arch, variables, calibration=None):
        spec = self.amap.spec
        if calibration is None:
            fixed = amap_lib.finalize_indicators(arch, variables, spec, self.target)
            return {**variables, INDICATORS: fixed}
        # The search's channel masks (a ratio of 1.0 trims none), the rest of the budget from
        # one shift of the thresholds ...
        untrimmed = {
            **variables,
            INDICATORS: amap_lib.finalize_indicators(arch, variables, spec, 1.0),
        }
        untrimmed[THRESHOLDS] = asvit_lib.calibrate(self, arch, untrimmed, calibration)
        if asvit_lib.search_ratio(self, arch, untrimmed, calibration) <= self.target + 1e-6:
            return untrimmed
        # ... unless the tokens cannot pay it alone: channels trimmed for the tokens they see.
        images = calibration(self.asvit.calibration_batch).images
        model = models.build(arch, sites=self)
        _, reports = jax.jit(lambda v, x: model.apply(v, x, mutable=[tokens.REPORTS]))(
            variables, images
        )
        keeps = reports[tokens.REPORTS]["token_gate"]["keep"]
        kept = [float(jnp.mean(jnp.sum(k, axis=-1))) for k in keeps]
        mean_tokens = macs.token_counts(arch, self.token_points(arch), kept)
        fixed = amap_lib.finalize_indicators(arch, variables, spec, self.target, tokens=mean_tokens)
        trimmed = {**variables, INDICATORS: fixed}
        return {**trimmed, THRESHOLDS: asvit_lib.calibrate(self, arch, trimmed, calibration)}

    def search_ratio(self, arch, variables, calibration=None):
        return asvit_lib.search_ratio(self, arch, variables, calibration)

    def recalibrate(self, arch, p_arch, params, calibration):
        return asvit_lib.recalibrate(self, arch, p_arch, params, calibration)

    def export(self, arch, variables):
        p_arch, p_params = super().export(arch, variables)
        return asvit_lib.token_export(self, arch, p_arch, p_params, variables)

    @property
    def calibration_batch(self) -> int:
        return self.asvit.calibration_batch
