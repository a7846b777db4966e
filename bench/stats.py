"""Paired comparisons over seeds: a difference with its 95% interval, and a verdict that says
no more than the interval does.

Two methods run with the same seed share the dense model, the data order and the calibration
images, so their difference on that seed is one observation; over n seeds the mean difference
gets a Student t interval with n - 1 degrees of freedom. A verdict ("better", "worse") is given
only when the interval excludes 0; otherwise "no difference detected at n=N".
"""

from __future__ import annotations

import math

import numpy as np

# Two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); beyond, a series in 1/df.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t95(df: int) -> float:
    if df < 1:
        return math.inf
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964  # the normal's, corrected for df (Cornish-Fisher, two terms)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(values) -> dict:
    """Mean of `values` with its 95% t interval: {mean, lo, hi, sd, n}."""
    x = np.asarray(values, np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    half = t95(n - 1) * sd / math.sqrt(n) if n > 1 else math.inf
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n}


def paired(a: dict, b: dict) -> dict:
    """a - b over the seeds both have ({seed: value}): the interval of the differences, the
    seeds used, and the verdict for a against b."""
    seeds = sorted(set(a) & set(b))
    out = interval([a[s] - b[s] for s in seeds])
    out["seeds"] = seeds
    out["verdict"] = verdict(out["lo"], out["hi"], out["n"])
    return out


def verdict(lo: float, hi: float, n: int) -> str:
    """What a 95% interval of a difference (a - b) allows one to say about a against b."""
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"too few seeds (n={n})"
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return f"no difference detected at n={n}"


def within(diff: dict, margin: float) -> str:
    """Whether an interval of a difference shows it within +-margin ("shown"), outside it
    ("not within"), or cannot tell ("not shown at n=N")."""
    if diff["n"] < 2:
        return f"too few seeds (n={diff['n']})"
    if -margin <= diff["lo"] and diff["hi"] <= margin:
        return "shown"
    if diff["lo"] > margin or diff["hi"] < -margin:
        return "not within"
    return f"not shown at n={diff['n']}"


def fmt(diff: dict, digits: int = 2) -> str:
    """'+0.31 [+0.05, +0.57]'."""
    if diff["n"] < 2:
        return f"{diff['mean']:+.{digits}f}"
    return f"{diff['mean']:+.{digits}f} [{diff['lo']:+.{digits}f}, {diff['hi']:+.{digits}f}]"
