"""The baselines every method must beat: magnitude and random channel choice, head-balanced.

Both fix their masks once, from the dense weights, at per-layer widths that are uniform (one
keep fraction for every q/k, v and MLP group, the largest that meets `search.target`), chosen
from their own scores (`baseline.layer_widths="scores"`: the head-balanced widths at the target
that lose the least score per MAC, `pruning.widths.at_target`, scores normalised to mean 1 per
group), or copied from another run's export (`method_widths_from=RUN`), so that "same widths,
other channel choice" is one command. The search stage then trains the weights under the fixed
masks, so a baseline gets the same training budget as a method that searches.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from amap_jax import models
from amap_jax.methods import projection
from amap_jax.methods.base import Method, SettingError, check, register
from amap_jax.models.arch import Arch
from amap_jax.pruning import allocate, channels, widths
from amap_jax.pruning import cost as cost_lib

MASKS = "masks"
BALANCED = ("qk", "v", "hidden")  # what uniform widths prune (AMAP's sites)

Counts = tuple  # per block: ((site, kept per head), ...)


@dataclasses.dataclass(frozen=True)
class Baseline(Method):
    section: ClassVar[str] = "baseline"
    takes_widths: ClassVar[bool] = True

    min_keep: int = 1  # per head
    layer_widths: str = "uniform"  # or "scores" (ignored with method_widths_from)
    # Per-block kept counts copied from an export (read from `method_widths_from`).
    widths: Counts | None = dataclasses.field(default=None, metadata={"setting": False})

    def __post_init__(self):
        check(self.min_keep >= 1, f"baseline.min_keep must be >= 1, got {self.min_keep}")
        check(
            self.layer_widths in ("uniform", "scores"),
            f"baseline.layer_widths must be 'uniform' or 'scores', got {self.layer_widths!r}",
        )

    @classmethod
    def from_config(cls, config) -> Baseline:
        run = config.method_widths_from
        widths = widths_from_export(run) if run else None
        return cls(target=config.search.target, widths=widths, **dict(config[cls.section]))

    @property
    def sites(self) -> tuple[str, ...]:
        if self.widths is None:
            return BALANCED
        return tuple(s for s, _ in self.widths[0])

    def check(self, arch):
        if self.widths is None:
            uniform_widths(arch, self)
        else:
            check_counts(self.widths, arch)

    def declare(self, block, shapes):
        masks = {s: block.variable(MASKS, s, jnp.ones, shapes[s]).value for s in self.sites}
        return self.block_multipliers({MASKS: masks})

    def block_multipliers(self, variables):
        return dict(variables[MASKS])

    def scores(self, arch: Arch, params, seed: int) -> list[dict[str, np.ndarray]]:
        """Per block, a [heads, width] score per site: the highest are kept."""
        raise NotImplementedError

    def initialize(self, arch, params, *, calibration, seed):
        if self.widths is not None:
            check_counts(self.widths, arch)
        scores = self.scores(arch, params, seed)
        if self.widths is not None:
            counts = self.widths
        elif self.layer_widths == "scores":
            counts = scored_widths(arch, scores, self.target, self.min_keep, self.cost)
        else:
            counts = uniform_widths(arch, self)
        masks = {}
        for i, (block_counts, block_scores) in enumerate(zip(counts, scores, strict=True)):
            masks[f"block_{i}"] = {
                s: keep_top(block_scores[s], k).astype(np.float32) for s, k in block_counts
            }
        return {"params": params, MASKS: masks}


def keep_top(scores, k: int) -> np.ndarray:
    """Boolean [heads, width]: the k highest scores of every head (ties: first channel)."""
    return np.asarray(projection.rank(jnp.asarray(scores))) < k


def uniform_widths(arch: Arch, baseline: Baseline) -> Counts:
    """One keep fraction for every group, the largest whose cost meets the target; then, one
    channel per head at a time, the groups furthest below their share get one more while the
    cost still meets it (one fraction alone steps by a whole channel of every group: 0.280 of
    ViT-mini4/7's MACs for a 0.3 target)."""
    sizes = [(b.qk_dim, b.v_dim, b.mlp_dim) for b in arch.blocks]

    def counts(f):
        return [[int(min(max(round(f * w), baseline.min_keep), w)) for w in ws] for ws in sizes]

    def cost_of(c):
        return float(baseline.cost.ratio(arch, [tuple(k) for k in c]))

    def ratio(f):
        return cost_of(counts(f))

    if ratio(0.0) > baseline.target:
        raise SettingError(
            f"{baseline.name} cannot reach {baseline.cost.label} ratio {baseline.target} with "
            "baseline.min_keep="
            f"{baseline.min_keep} per head"
        )
    kept = counts(allocate.highest(ratio, baseline.target, 0.0, 1.0))
    while True:
        order = sorted(
            (kept[i][j] / w, i, j)
            for i, ws in enumerate(sizes)
            for j, w in enumerate(ws)
            if kept[i][j] < w
        )
        for _, i, j in order:
            kept[i][j] += 1
            if cost_of(kept) <= baseline.target:
                break
            kept[i][j] -= 1
        else:
            break
    return tuple(tuple(zip(("qk", "v", "hidden"), k, strict=True)) for k in kept)


def scored_widths(
    arch: Arch, scores, target: float, min_keep: int, cost: cost_lib.Cost = cost_lib.MACS
) -> Counts:
    """Head-balanced widths at the target from the scores, each group's scores divided by
    their mean so that layers compare (`pruning.widths.at_target`)."""
    normal = [
        {s: np.asarray(v, np.float64) / (np.mean(np.abs(v)) + 1e-12) for s, v in b.items()}
        for b in scores
    ]
    try:
        plan = widths.at_target(
            arch, normal, target, minimum=lambda s, w: min(min_keep, w), cost=cost
        )
    except ValueError as e:
        raise SettingError(f"baseline: {e} (baseline.min_keep={min_keep})") from None
    return tuple(tuple((s, b[s]) for s in BALANCED) for b in plan.counts)


def widths_from_export(run: str) -> Counts:
    """Kept counts per block and site of another run's export (a workdir or an export dir)."""
    from amap_jax.io import paths, pruned

    directory = paths.join(run, "export") if paths.isdir(paths.join(run, "export")) else run
    try:
        other = pruned.read_arch(directory)
    except (FileNotFoundError, ValueError) as e:
        raise SettingError(f"method_widths_from: {e}") from None
    return counts_of(other)


def counts_of(arch: Arch) -> Counts:
    """Per block, the kept count per head of every site an export pruned: q/k, v and MLP
    always, input dimensions where any block has fewer than the residual width."""
    shapes = [
        models.site_shapes(b, g.dim) for b, g in zip(arch.blocks, arch.geometry(), strict=True)
    ]
    inputs = [s for s in ("attn_in", "mlp_in") if any(getattr(b, s) for b in arch.blocks)]
    sites = ("qk", "v", "hidden", *inputs)
    return tuple(tuple((s, sh[s][1]) for s in sites) for sh in shapes)


def check_counts(counts: Counts, arch: Arch) -> None:
    """Counts copied from an export must fit the dense model: same blocks and heads."""
    if len(counts) != len(arch.blocks):
        raise SettingError(
            f"method_widths_from: the export has {len(counts)} blocks, the model {len(arch.blocks)}"
        )
    for i, (c, b, g) in enumerate(zip(counts, arch.blocks, arch.geometry(), strict=True)):
        shapes = models.site_shapes(b, g.dim)
        for s, k in c:
            if not 1 <= k <= shapes[s][1]:
                raise SettingError(
                    f"method_widths_from: block {i} keeps {k} {s} channels per head; the model "
                    f"has {shapes[s][1]}"
                )


@register
@dataclasses.dataclass(frozen=True)
class Magnitude(Baseline):
    """Keeps the channels whose weights have the largest L1 norm."""

    name: ClassVar[str] = "magnitude"

    def scores(self, arch, params, seed):
        return [
            {
                s: np.asarray(m)
                for s, m in channels.magnitude(params[f"block_{i}"], b.heads, self.sites).items()
            }
            for i, b in enumerate(arch.blocks)
        ]


@register
@dataclasses.dataclass(frozen=True)
class Random(Baseline):
    """Keeps channels drawn at random (seeded)."""

    name: ClassVar[str] = "random"

    def scores(self, arch, params, seed):
        rng = np.random.default_rng(seed)
        return [
            {
                s: rng.random(shape)
                for s, shape in models.site_shapes(b, g.dim).items()
                if s in self.sites
            }
            for b, g in zip(arch.blocks, arch.geometry(), strict=True)
        ]
