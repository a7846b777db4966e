"""Scores to head-balanced widths at a target: the one function every score-based method uses
to turn per-channel scores into the channels each layer keeps.

Starting from given counts (the masks a search ended with, or every channel), channels are
removed where the least score is lost per unit of cost saved (`pruning.cost`: a MAC, or a
second of the latency model) until the model's cost meets the target:
one per head at a time (or `multiple`), so that every head of a layer keeps the same count.
Without head balancing a layer's heads keep different counts and export pads every head to
the widest, so MACs count the widest head: a step then removes the lowest-scored channel of
each head at that width.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from amap_jax.models.arch import Arch
from amap_jax.pruning import cost as cost_lib
from amap_jax.pruning import macs

Scores = list  # per block: {site: [heads, width] array}, higher = keep


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per block: {site: kept channels per head}, or without head balancing {site: [heads]
    kept per head}; and the cost ratio they give (the widest head, where heads differ)."""

    counts: list
    ratio: float

    def masks(self, scores: Scores) -> list[dict[str, np.ndarray]]:
        """[heads, width] 0/1 masks keeping the top-scored channels of every head."""
        out = []
        for block_counts, block_scores in zip(self.counts, scores, strict=True):
            out.append({s: top(np.asarray(block_scores[s]), k) for s, k in block_counts.items()})
        return out


def top(scores: np.ndarray, k) -> np.ndarray:
    """[heads, width] 0/1: the k (per head: an int, or one per head) highest of each head, ties
    to the first channel."""
    rank = np.argsort(np.argsort(-scores, axis=-1, kind="stable"), axis=-1, kind="stable")
    return (rank < np.reshape(np.asarray(k), (-1, 1))).astype(np.float32)


def block_widths(arch: Arch, i: int, counts: dict, dim: int | None = None) -> macs.Widths:
    """A block's MACs widths from kept counts (the widest head where heads differ)."""
    dim = arch.geometry()[i].dim if dim is None else dim
    w = macs.widths(arch.blocks[i], dim)._asdict()
    for site, k in counts.items():
        w[site] = float(np.max(k))
    return macs.Widths(**w)


def ratio(arch: Arch, counts: list, tokens=None, cost: cost_lib.Cost = cost_lib.MACS) -> float:
    widths = [block_widths(arch, i, c) for i, c in enumerate(counts)]
    return float(cost.ratio(arch, widths, tokens))


def at_target(
    arch: Arch,
    scores: Scores,
    target: float,
    *,
    start: list | None = None,
    minimum=lambda site, width: 1,
    multiple: int = 1,
    balanced: bool = True,
    tokens: list | None = None,
    cost: cost_lib.Cost = cost_lib.MACS,
) -> Plan:
    """The counts, from `start` (default: every channel), that meet `cost` ratio `target`,
    removing where the least score is lost per unit of cost saved; `minimum(site, width)` is the
    fewest channels a head keeps; `tokens`: per block, the tokens it sees (token pruning). A
    ValueError when every site is at its per-head minimum above the target."""
    geometry = arch.geometry()
    counts = []
    for i, block_scores in enumerate(scores):
        start_i = None if start is None else start[i]
        block = {}
        for site, s in block_scores.items():
            heads, width = np.shape(s)
            k = width if start_i is None else start_i[site]
            block[site] = int(k) if balanced else np.broadcast_to(np.asarray(k), (heads,)).copy()
        counts.append(block)
    # Scores sorted down each head: removing the lowest kept one costs sorted[:, k - 1].
    ordered = [{s: -np.sort(-np.asarray(v, np.float64), -1) for s, v in b.items()} for b in scores]

    def block_cost(i: int, w: dict) -> float:
        n = None if tokens is None else tokens[i]
        g = geometry[i]
        return float(cost.block(arch, i, block_widths(arch, i, w, g.dim), n, g))

    def candidate(i: int, site: str):
        """(score lost per MAC saved, new count) of the next step at a site, or None."""
        k = counts[i][site]
        width = ordered[i][site].shape[1]
        least = minimum(site, width)
        if balanced:
            new = k - multiple  # whole multiples only: a count stays a multiple
            if new < least:
                return None
            lost = ordered[i][site][:, new:k].sum()
        else:
            widest = int(np.max(k))
            if widest - 1 < least:
                return None
            new = np.where(k == widest, widest - 1, k)
            rows = np.flatnonzero(k == widest)
            lost = ordered[i][site][rows, widest - 1].sum()
        now = block_cost(i, counts[i])
        saving = now - block_cost(i, {**counts[i], site: new})
        if saving <= 0:
            return None
        return lost / saving, new, saving

    dense = float(cost.model(arch))
    budget = target * dense
    total = sum(block_cost(i, c) for i, c in enumerate(counts)) + float(cost.fixed(arch))
    cache = {(i, s): candidate(i, s) for i, b in enumerate(counts) for s in b}
    while total > budget * (1 + 1e-9):
        options = [(c[0], key) for key, c in cache.items() if c is not None]
        if not options:
            raise ValueError(
                f"cannot reach {cost.label} ratio {target}: every layer is at its per-head minimum "
                f"({total / dense:.3f})"
            )
        _, (i, site) = min(options, key=lambda o: (o[0], o[1]))
        _, new, saving = cache[i, site]
        counts[i][site] = new
        total -= saving
        for s in counts[i]:  # a block's costs depend on all its widths
            cache[i, s] = candidate(i, s)
    plain = [
        {s: (int(k) if balanced else [int(x) for x in k]) for s, k in b.items()} for b in counts
    ]
    return Plan(plain, ratio(arch, plain, tokens, cost))


def min_count(width: int, min_keep: int = 1, fraction: float = 0.0) -> int:
    """The fewest channels a head of `width` keeps: `min_keep`, or a share of its width."""
    return min(max(min_keep, math.ceil(fraction * width)), width)
