"""Where a budget lands: the one bisection that every method's allocation runs.

Each method turns its scores into what it keeps through one number and finds that number
against its cost ratio (`pruning.cost`): VTP how many of its sorted scores the global threshold
cuts, the baselines one keep fraction for every group, AS-ViT one shift of its token thresholds,
AMAP one shift of its indicator logits (traced, inside the optimizer). The greedy per-channel
allocation is `pruning.widths.at_target`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lowest(ratio, target: float, lo, hi, *, steps: int = 40, integer: bool = False):
    """The smallest x in [lo, hi] with ratio(x) <= target, for a ratio that falls as x rises
    and meets the target at `hi`: exact over integers, else after `steps` halvings (the
    bracket's upper end, which meets it)."""
    if integer:
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ratio(mid) <= target else (mid + 1, hi)
        return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if float(ratio(mid)) <= target else (mid, hi)
    return hi


def highest(ratio, target: float, lo: float, hi: float, *, steps: int = 40) -> float:
    """The largest x in [lo, hi] with ratio(x) <= target, for a ratio that rises with x and
    meets the target at `lo`, after `steps` halvings (the bracket's lower end)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(ratio(mid)) <= target else (lo, mid)
    return lo


def traced_level(ratio, aim, lo: float, hi: float, steps: int) -> jax.Array:
    """Where a ratio that rises with x crosses `aim` in [lo, hi], traceable under jit (a
    `fori_loop` of `steps` halvings; the last bracket's midpoint)."""

    def halve(_, bounds):
        low, high = bounds
        mid = (low + high) / 2
        over = ratio(mid) > aim
        return jnp.where(over, low, mid), jnp.where(over, mid, high)

    low, high = jax.lax.fori_loop(0, steps, halve, (jnp.float32(lo), jnp.float32(hi)))
    return (low + high) / 2
