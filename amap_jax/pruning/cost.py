"""What a pruning budget charges: MACs, or the latency a model of the backend predicts.

Every budget (AMAP's projection and fix-up, VTP's threshold, the baselines' widths,
`pruning.widths.at_target`) asks a `Cost` for a block's cost at given widths and never names the
kind: `MACS` counts multiply-adds (`pruning.macs`); a `Latency` interpolates the seconds that
`amap_jax.latency` measured for each block's attention over (q/k, v) per head and its MLP over
the hidden width, on the backend that will run the model, plus one measured constant for the
rest (embedding, norms, head, the per-call overhead the layers timed alone add). The widths may
be floats (a search's soft widths, traced by jit) or ints; a latency is piecewise linear in
them, so a soft search sees a slope everywhere. Pruned inputs (VTP's `attn_in`, `mlp_in`) scale
their layer's time by its MACs share. Pure arithmetic: nothing here times anything.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax.models.arch import Arch
from amap_jax.pruning import macs

KINDS = ("macs", "latency")


class Cost:
    """A budget's currency: the cost of a block at widths (`macs.Widths`, or (qk, v, hidden)
    triples with unpruned inputs) and of what pruning does not touch."""

    kind: ClassVar[str]
    label: ClassVar[str]  # as a message names it

    def block(self, arch: Arch, i: int, w, tokens=None, g=None):
        """Cost of block i at widths `w`; `g`: its geometry, where the caller has it (computing
        a model's geometry per block call doubled a greedy allocation's time)."""
        raise NotImplementedError

    def fixed(self, arch: Arch):
        raise NotImplementedError

    def model(self, arch: Arch, block_widths: list | None = None, tokens: list | None = None):
        """Cost of one image (a batch, for a latency) through `arch` at other per-block widths
        (None: its own) and token counts (None: all tokens)."""
        total = self.fixed(arch)
        for i, g in enumerate(arch.geometry()):
            w = None if block_widths is None else block_widths[i]
            total = total + self.block(arch, i, w, None if tokens is None else tokens[i], g)
        return total

    def ratio(self, arch: Arch, block_widths: list | None = None, tokens: list | None = None):
        """Cost at the widths over the dense model's."""
        return self.model(arch, block_widths, tokens) / float(self.model(arch))

    def of(self, arch: Arch, smaller: Arch) -> float:
        """Cost(smaller) / cost(arch), `smaller` a pruned (or padded) `arch`."""
        w = [macs.widths(b, g.dim) for b, g in zip(smaller.blocks, smaller.geometry(), strict=True)]
        return float(self.ratio(arch, w))


@dataclasses.dataclass(frozen=True)
class Macs(Cost):
    kind: ClassVar[str] = "macs"
    label: ClassVar[str] = "MACs"

    def block(self, arch, i, w, tokens=None, g=None):
        g = g or arch.geometry()[i]
        return macs.block_macs(arch.blocks[i], g, arch.kernel_size, w, tokens)

    def fixed(self, arch):
        return macs.fixed_macs(arch)


MACS = Macs()


@dataclasses.dataclass(frozen=True)
class Table:
    """Seconds measured at knots: `y` is empty for a 1-D table (over `x`), else `seconds[i][j]`
    is at (x[i], y[j])."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    seconds: tuple

    @classmethod
    def from_json(cls, t: dict) -> Table:
        seconds = tuple(tuple(r) if isinstance(r, list) else r for r in t["seconds"])
        return cls(tuple(t["x"]), tuple(t["y"]), seconds)

    def __call__(self, x, y=None):
        xp = jnp if _traced(x, y) else np
        s = xp.asarray(self.seconds, xp.float32 if xp is jnp else np.float64)
        i, tx = _segment(self.x, x, xp)
        if not self.y:
            return s[i] + tx * (s[i + 1] - s[i])
        j, ty = _segment(self.y, y, xp)
        low = s[i, j] + ty * (s[i, j + 1] - s[i, j])
        high = s[i + 1, j] + ty * (s[i + 1, j + 1] - s[i + 1, j])
        return low + tx * (high - low)


def _traced(*xs) -> bool:
    return any(isinstance(x, jax.Array) for x in xs)


def _segment(knots, x, xp):
    """The knot interval of x (the first or last beyond the ends: linear extrapolation) and
    where x lies in it."""
    k = xp.asarray(knots, xp.float32 if xp is jnp else np.float64)
    i = xp.clip(xp.searchsorted(k, x, side="right") - 1, 0, len(knots) - 2)
    return i, (x - k[i]) / (k[i + 1] - k[i])


@dataclasses.dataclass(frozen=True)
class Latency(Cost):
    """Per block the attention's table over (q/k, v) per head and the MLP's over the hidden
    width, in seconds per batch of `batch` at `dtype` on `device`; `constant`: the measured
    dense model minus its blocks' predictions. Hashable (a method holds it)."""

    kind: ClassVar[str] = "latency"
    label: ClassVar[str] = "latency"
    attention: tuple[Table, ...]
    mlp: tuple[Table, ...]
    constant: float
    batch: int
    dtype: str
    device: str

    def block(self, arch, i, w, tokens=None, g=None):
        if tokens is not None:
            raise ValueError("a latency budget does not model token pruning (per-image tokens)")
        b, g = arch.blocks[i], g or arch.geometry()[i]
        w = macs.as_widths(b, g.dim, w)
        attn = self.attention[i](w.qk, w.v)
        if not (_static(w.attn_in) and w.attn_in == g.dim):  # pruned inputs: their MACs share
            full = macs.block_macs(b, g, arch.kernel_size, (w.qk, w.v, 0.0, g.dim, g.dim))
            part = macs.block_macs(b, g, arch.kernel_size, (w.qk, w.v, 0.0, w.attn_in, g.dim))
            attn = attn * part / full
        mlp = self.mlp[i](w.hidden)
        if not (_static(w.mlp_in) and w.mlp_in == g.dim):
            mlp = mlp * (w.mlp_in + g.dim) / (2 * g.dim)
        return attn + mlp

    def fixed(self, arch):
        return self.constant

    def values(self) -> np.ndarray:
        """Every measured number, flat (the same order `with_values` reads)."""
        tables = (*self.attention, *self.mlp)
        return np.concatenate([np.ravel(t.seconds) for t in tables] + [[self.constant]])

    def with_values(self, flat) -> Latency:
        """The same model with other measured numbers (another process's: one table for all)."""
        flat, start, out = np.asarray(flat, np.float64), 0, []
        for t in (*self.attention, *self.mlp):
            shape = np.shape(t.seconds)
            part = flat[start : start + int(np.prod(shape))].reshape(shape)
            start += part.size
            seconds = (
                tuple(map(float, part)) if part.ndim == 1 else tuple(map(tuple, part.tolist()))
            )
            out.append(dataclasses.replace(t, seconds=seconds))
        n = len(self.attention)
        return dataclasses.replace(
            self, attention=tuple(out[:n]), mlp=tuple(out[n:]), constant=float(flat[start])
        )

    def to_json(self) -> dict:
        return {
            **{k: getattr(self, k) for k in ("constant", "batch", "dtype", "device")},
            "attention": [dataclasses.asdict(t) for t in self.attention],
            "mlp": [dataclasses.asdict(t) for t in self.mlp],
        }

    @classmethod
    def from_json(cls, d: dict) -> Latency:
        return cls(
            tuple(map(Table.from_json, d["attention"])),
            tuple(map(Table.from_json, d["mlp"])),
            float(d["constant"]),
            int(d["batch"]),
            d["dtype"],
            d["device"],
        )


def _static(x) -> bool:
    return not isinstance(x, jax.core.Tracer)
