"""The latency model of the backend a run is on: what `search.budget_kind=latency` charges.

Each block's attention is timed at a grid of (q/k, v) widths per head and its MLP at a row of
hidden widths (`knots`: 1, the full width and evenly spaced multiples of 8 between), in the
run's dtype, at the budget's batch, every knot of a layer interleaved round by round with the
others (`timing.interleaved`). A layer runs `REPEATS` times in one program on its own output
plus its input, as a block's residual does, and counts a repeat's share: a layer called alone
would count a program launch that a model pays once, not per layer. Blocks of one shape are
measured once; the tables are cached per backend, device kind, jax version, XLA
flags, layer code, dtype, batch and shape (like `export_speed`'s cache). The whole dense model is
timed too: what its blocks' predictions leave over is the model's constant
(`pruning.cost.Latency`). How well the sum predicts a pruned model: bench/latency_model.py.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from amap_jax import export_speed, models, timing
from amap_jax.models.arch import Arch
from amap_jax.pruning.cost import Latency, Table

CACHE = os.path.join(os.path.dirname(export_speed.CACHE), "latency.json")
KNOTS = 5  # per axis: an attention is timed at KNOTS^2 widths, an MLP at KNOTS
# Added to each table as a share of its largest time per unit of relative width: a flat stretch
# (measured times that do not fall with the width) still ranks a channel, as MACs would.
TIE_SLOPE = 1e-3
REPEATS = 8
SECONDS = 0.1  # per knot and round


def knots(width: int, count: int = KNOTS) -> tuple[int, ...]:
    """Widths a layer is timed at: 1, `width`, and `count - 2` between, on multiples of 8
    where the width allows (the widths export padding favours)."""
    if width <= count:
        return tuple(range(1, width + 1)) if width > 1 else (1, 1)
    step = 8 if width >= 8 * (count - 1) else 1
    inner = {max(1, round(width * j / (count - 1) / step) * step) for j in range(1, count - 1)}
    return tuple(sorted({1, width} | inner))


def _seconds(fns: dict, batch: int, seconds: float, rounds: int) -> dict:
    """Median seconds per call of each blocking `fn`, interleaved."""
    ips = timing.interleaved(fns, seconds, rounds, batch)
    return {k: batch / float(np.median(v)) for k, v in ips.items()}


def _repeated(arch: Arch, b, g, part: str, batch: int, dtype):
    """A blocking call running one layer `REPEATS` times on its own output plus its input."""
    module, variables, x = export_speed.layer_inputs(arch, b, g, part, batch, dtype)

    def run(v, x):
        return jax.lax.fori_loop(0, REPEATS, lambda _, h: h + module.apply(v, h), x)

    fn = jax.jit(run)
    return lambda: jax.block_until_ready(fn(variables, x))


def _table(arch: Arch, i: int, part: str, batch: int, dtype: str, count, seconds, rounds):
    b, g = arch.blocks[i], arch.geometry()[i]
    dt = models.compute_dtype(dtype)
    if part == "attention":
        xs, ys = knots(b.qk_dim, count), knots(b.v_dim, count)
        xs_u, ys_u = sorted(set(xs)), sorted(set(ys))
        fns = {
            (q, v): _repeated(arch, dataclasses.replace(b, qk_dim=q, v_dim=v), g, part, batch, dt)
            for q in xs_u
            for v in ys_u
        }
        t = {k: s / REPEATS for k, s in _seconds(fns, batch, seconds, rounds).items()}
        grid = np.array([[t[q, v] for v in ys] for q in xs])
        grid = np.maximum.accumulate(np.maximum.accumulate(grid, 0), 1)  # never faster wider
        rel = np.asarray(xs)[:, None] / xs[-1] + np.asarray(ys)[None, :] / ys[-1]
        grid = grid + TIE_SLOPE * grid.max() * rel
        return Table(xs, ys, tuple(tuple(float(s) for s in r) for r in grid))
    xs = knots(b.mlp_dim, count)
    fns = {
        h: _repeated(arch, dataclasses.replace(b, mlp_dim=h), g, part, batch, dt) for h in set(xs)
    }
    t = {k: s / REPEATS for k, s in _seconds(fns, batch, seconds, rounds).items()}
    row = np.maximum.accumulate(np.array([t[h] for h in xs]))
    row = row + TIE_SLOPE * row.max() * np.asarray(xs) / xs[-1]
    return Table(xs, (), tuple(float(s) for s in row))


def _key(arch: Arch, i: int, part: str, batch: int, dtype: str, count: int) -> str:
    b, g = arch.blocks[i], arch.geometry()[i]
    return (  # how a layer is timed is part of the key: another way makes other numbers
        f"{export_speed.device_key()}|batch {batch}|dtype {dtype}|knots {count}"
        f"|{REPEATS} repeats per program|{export_speed.part_key(arch, b, g, part)}"
    )


def dense_seconds(arch: Arch, batch: int, dtype: str, *, seconds: float, rounds: int) -> float:
    """Median seconds per batch of the dense model (random weights) at `batch`."""
    model = models.build(arch, dtype=models.compute_dtype(dtype))
    x = jax.random.normal(jax.random.key(0), models.dummy_input(arch, batch).shape)
    variables = model.init(jax.random.key(1), x)
    fn = jax.jit(model.apply)
    call = lambda: jax.block_until_ready(fn(variables, x))  # noqa: E731
    return _seconds({"dense": call}, batch, seconds, rounds)["dense"]


def measure(
    arch: Arch,
    batch: int = 1,
    dtype: str = "float32",
    *,
    count: int | None = None,
    seconds: float | None = None,
    rounds: int = 3,
    cache: str | bool | None = True,
) -> Latency:
    """The latency model of `arch` on this backend (each layer shape measured once, cached in
    `cache`: True for `CACHE`, None for none). `count` knots per axis (None: `KNOTS`),
    `seconds` per knot and round (None: `SECONDS`)."""
    count, seconds = count or KNOTS, seconds or SECONDS
    cache = CACHE if cache is True else cache
    if arch.token_points:
        raise ValueError("a latency budget does not model token pruning (per-image tokens)")
    stored = export_speed.read_cache(cache)
    tables = {"attention": [], "mlp": []}
    for i in range(len(arch.blocks)):
        for part in tables:
            key = _key(arch, i, part, batch, dtype, count)
            if key not in stored:
                stored[key] = dataclasses.asdict(
                    _table(arch, i, part, batch, dtype, count, seconds, rounds)
                )
                if cache:
                    export_speed.write_cache(cache, stored)
            tables[part].append(Table.from_json(stored[key]))
    key = f"{export_speed.cache_key(arch, batch)}|dtype {dtype}|dense seconds"
    if key not in stored:
        stored[key] = dense_seconds(arch, batch, dtype, seconds=seconds, rounds=rounds)
        if cache:
            export_speed.write_cache(cache, stored)
    blocks = Latency(
        tuple(tables["attention"]),
        tuple(tables["mlp"]),
        0.0,
        batch,
        dtype,
        export_speed.device_key(),
    )
    return dataclasses.replace(blocks, constant=stored[key] - float(blocks.model(arch)))
