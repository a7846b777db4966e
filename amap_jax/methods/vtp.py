"""VTP (Zhu, Tang, Han, "Vision Transformer Pruning", arXiv 2104.08500).

Soft importance scores (init 1) multiply the features at the four places the paper names: the
LayerNorm output feeding q/k/v (`attn_in`), the attention output before the projection (`v`),
the LayerNorm output feeding fc1 (`mlp_in`) and the MLP hidden units (`hidden`). They are trained
with the weights under CE + l1_weight * sum |score| ("sparse training"). Pruning is one global
threshold over every score: either the paper's rule (prune a `rate` of all dimensions) or the
threshold that makes the exported model meet `search.target` (of its MACs, or of the latency
model's seconds: `pruning.cost`), found by bisection, so that VTP compares with AMAP at an
equal budget. As in the paper, scores under the threshold become 0 and
the others 1 (`fold_scores=True`, a variant reported as such, keeps the kept scores' values and
folds them into the kernels). Value channels differ per head, so the exported attention is
padded to the widest head; MACs count the padding.
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
from amap_jax.pruning import allocate, widths

SCORES = "scores"
SITES = ("attn_in", "v", "mlp_in", "hidden")


@register
@dataclasses.dataclass(frozen=True)
class Vtp(Method):
    name: ClassVar[str] = "vtp"
    section: ClassVar[str] = "vtp"
    trainable: ClassVar[tuple[str, ...]] = (SCORES,)

    l1_weight: float = 1e-4  # lambda of the L1 penalty on the scores (summed over all of them)
    score_lr: float = 3e-3  # Adam on the scores (no weight decay: the L1 term is the prior)
    rule: str = "target"  # "target": threshold meets search.target MACs; "rate": the paper's
    rate: float = 0.2  # share of all score entries pruned when rule="rate"
    min_keep: int = 1  # per site, the best-scored channels survive any threshold
    fold_scores: bool = False  # the paper: kept scores become 1; True: their values are folded

    def __post_init__(self):
        check(
            self.rule in ("target", "rate"),
            f"vtp.rule must be 'target' or 'rate', got {self.rule!r}",
        )
        check(0.0 <= self.rate < 1.0, f"vtp.rate must be in [0, 1), got {self.rate}")
        check(self.l1_weight >= 0, f"vtp.l1_weight must be >= 0, got {self.l1_weight}")
        check(self.score_lr > 0, f"vtp.score_lr must be > 0, got {self.score_lr}")
        check(self.min_keep >= 1, f"vtp.min_keep must be >= 1, got {self.min_keep}")

    def check(self, arch):
        if self.rule == "target":
            ones = self.initialize(arch, None, calibration=None, seed=0)[SCORES]
            self._cut(arch, ones)

    def declare(self, block, shapes):
        scores = {s: block.variable(SCORES, s, jnp.ones, shapes[s]).value for s in SITES}
        return self.block_multipliers({SCORES: scores})

    def block_multipliers(self, variables):
        return {s: variables[SCORES][s] for s in SITES}

    def initialize(self, arch, params, *, calibration, seed):
        scores = {
            f"block_{i}": {
                s: jnp.ones(shape, jnp.float32)
                for s, shape in models.site_shapes(b, g.dim).items()
                if s in SITES
            }
            for i, (b, g) in enumerate(zip(arch.blocks, arch.geometry(), strict=True))
        }
        return {"params": params, SCORES: scores}

    def optimizers(self, total_steps: int = 0, arch=None):
        return {SCORES: optax.adam(self.score_lr)}

    def loss(self, arch, total_steps: int = 0):
        def l1(trainable, reports=None, batch_mean=None, step=None):
            total = sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(trainable[SCORES]))
            return self.l1_weight * total, {"l1": total}

        return l1

    def finalize(self, arch, variables, calibration=None):
        scores = variables[SCORES]
        order, n = self._cut(arch, scores)
        kept = _prune(scores, order[:n])
        if not self.fold_scores:  # the paper's rule: what survives the threshold is kept as is
            kept = jax.tree.map(lambda x: (x != 0).astype(np.float32), kept)
        return {**variables, SCORES: kept}

    def report(self, arch, variables):
        """Where the search left the scores: a histogram of |score| (they start at 1)."""
        values = np.abs(np.concatenate([np.ravel(x) for x in jax.tree.leaves(variables[SCORES])]))
        edges = np.linspace(0.0, max(1.5, float(values.max())), 31)
        counts, _ = np.histogram(values, edges)
        quantiles = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
        return {
            "score_histogram": {
                "edges": [round(float(e), 4) for e in edges],
                "counts": [int(c) for c in counts],
            },
            "score_quantiles": {
                q: round(float(v), 4)
                for q, v in zip(("5%", "25%", "50%", "75%", "95%"), quantiles, strict=True)
            },
        }

    def search_ratio(self, arch, variables, calibration=None):
        return None  # the widths are the threshold's, by the paper's rule

    def progress(self, arch, variables):
        order, n = self._cut(arch, variables[SCORES])
        return {"share_cut_now": n / _count(variables[SCORES])}

    def _cut(self, arch, scores) -> tuple[list, int]:
        """Entries in pruning order, and how many of them the rule cuts."""
        order, protected = _ranking(arch, scores, self.min_keep)
        if self.rule == "rate":
            return order, min(int(round(self.rate * (len(order) + protected))), len(order))

        def ratio(n):  # of the export, every head padded to the widest
            return widths.ratio(arch, _counts(_prune(scores, order[:n])), cost=self.cost)

        if ratio(len(order)) > self.target:
            raise SettingError(
                f"vtp cannot reach {self.cost.label} ratio {self.target}: "
                f"{ratio(len(order)):.3f} with every unprotected dimension pruned (vtp.min_keep)"
            )
        # the fewest cut entries that meet the target: the cost never grows with more cut
        return order, allocate.lowest(ratio, self.target, 0, len(order), integer=True)


def _count(scores) -> int:
    return sum(np.size(x) for x in jax.tree.leaves(scores))


def _flat(arch, scores):
    """Every score entry as (|score|, block, site, flat index)."""
    out = []
    for i in range(len(arch.blocks)):
        for s in SITES:
            a = np.abs(np.asarray(scores[f"block_{i}"][s])).reshape(-1)
            out.extend((float(v), i, s, j) for j, v in enumerate(a))
    return out


def _ranking(arch, scores, min_keep) -> tuple[list, int]:
    """Entries in pruning order (smallest |score| first), leaving out the best `min_keep` of
    each site; and how many were left out."""
    entries = _flat(arch, scores)
    protected = set()
    for i in range(len(arch.blocks)):
        for s in SITES:
            a = np.abs(np.asarray(scores[f"block_{i}"][s])).reshape(-1)
            best = np.argsort(-a, kind="stable")[:min_keep]
            protected.update((i, s, int(j)) for j in best)
    order = sorted((e for e in entries if (e[1], e[2], e[3]) not in protected), key=lambda e: e[0])
    return [(i, s, j) for _, i, s, j in order], len(protected)


def _prune(scores, drop):
    """Scores with the `drop` entries set to exactly 0 (what the model and export see)."""
    out = jax.tree.map(lambda x: np.array(x, np.float32), scores)
    for i, s, j in drop:
        flat = out[f"block_{i}"][s].reshape(-1)
        flat[j] = 0.0
        out[f"block_{i}"][s] = flat.reshape(out[f"block_{i}"][s].shape)
    return out


def _counts(scores):
    """Per block, the channels each head of every site keeps (non-zero scores)."""
    return [
        {s: (np.asarray(scores[f"block_{i}"][s]) != 0).sum(-1) for s in SITES}
        for i in range(len(scores))
    ]


def threshold(variables) -> float:
    """The global |score| threshold a finalized VTP model was cut at (largest pruned |score|
    is below it): the smallest kept |score|."""
    kept = [np.abs(x[x != 0]) for x in map(np.asarray, jax.tree.leaves(variables[SCORES]))]
    return float(min(k.min() for k in kept if k.size))
