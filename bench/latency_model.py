"""How well the latency model (`amap_jax.latency`) predicts a pruned model, and whether a latency
target lands where it is asked to.

  python -m bench.latency_model [--models mini4:LLSS,S] [--batches 1,64] [--configs 20]
      [--targets 0.7,0.5] [--rounds 5] [--seconds 0.5]

Per model and batch: the latency model is measured afresh (no cache), then the dense model and
`--configs` models at random head-balanced widths per block (q/k and v per head, MLP hidden;
random weights: speed does not depend on the values) are timed interleaved in the same rounds.
A model's measured ratio is the median over rounds of its seconds over the dense model's in the
same round; its error is predicted / measured - 1, reported as the median and the worst |error|
over the configurations, beside what the MACs ratio would have predicted. Then, per target, the
widths `pruning.widths.at_target` gives for random scores with the latency cost and with the
MACs cost are timed against the dense model: the latency each target achieves. Writes
latency_model_<backend>[_TAG].json and .md.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import flags

from amap_jax import export_speed, latency, models
from amap_jax.methods.amap import group_shapes
from amap_jax.pruning import cost, macs, widths
from bench import common

_BATCHES = flags.DEFINE_list("batches", ["1", "64"], "Batch sizes.")
common.check_list(_BATCHES, int, lambda b: b >= 1, "batch sizes (integers >= 1)")
_CONFIGS = flags.DEFINE_integer(
    "configs", 20, "Random width configurations per model.", lower_bound=1
)


def at_widths(arch, counts: list[tuple[int, int, int]]):
    """`arch` with per-block (q/k, v, hidden) widths (the dense softmax scale kept)."""
    blocks = tuple(
        dataclasses.replace(b, qk_dim=q, v_dim=v, mlp_dim=h, qk_scale=b.scale)
        for b, (q, v, h) in zip(arch.blocks, counts, strict=True)
    )
    return arch.replace(blocks=blocks)


def random_counts(arch, rng) -> list[tuple[int, int, int]]:
    """Per block, widths drawn between an eighth of each width and all of it."""
    draw = lambda w: int(rng.integers(max(1, w // 8), w + 1))  # noqa: E731
    return [(draw(b.qk_dim), draw(b.v_dim), draw(b.mlp_dim)) for b in arch.blocks]


def _params(arch, seed: int = 0):
    return models.build(arch).init(jax.random.key(seed), models.dummy_input(arch))["params"]


def _timed(arch, variants: dict, batch: int, seconds: float, rounds: int) -> dict[str, list]:
    """Per variant, its seconds over the dense model's in each round (interleaved)."""
    runs = {"dense": (arch, _params(arch))} | {k: (a, _params(a)) for k, a in variants.items()}
    ips = export_speed.rates(runs, batch, seconds=seconds, rounds=rounds)
    return {k: [d / p for p, d in zip(ips[k], ips["dense"], strict=True)] for k in variants}


def measure(arch, batch: int, n: int, targets, *, seconds: float, rounds: int, seed: int = 0):
    lat = latency.measure(arch, batch, cache=None)
    rng = np.random.default_rng(seed)
    configs = [random_counts(arch, rng) for _ in range(n)]
    scores = [{s: rng.random(shape) for s, shape in group_shapes(b).items()} for b in arch.blocks]
    plans, unreachable = {}, {}
    for t in targets:
        for c in (lat, cost.MACS):
            try:
                plan = widths.at_target(arch, scores, t, cost=c)
            except ValueError:  # every width at 1 stays above it: launch-bound at this batch
                unreachable[f"{c.kind} target {t}"] = round(
                    float(c.ratio(arch, [(1, 1, 1)] * len(arch.blocks))), 4
                )
                continue
            plans[f"{c.kind} target {t}"] = [(b["qk"], b["v"], b["hidden"]) for b in plan.counts]
    variants = {f"random {i}": at_widths(arch, c) for i, c in enumerate(configs)}
    variants |= {k: at_widths(arch, c) for k, c in plans.items()}
    measured = _timed(arch, variants, batch, seconds, rounds)
    dense_macs = macs.model_macs(arch)
    rows = []
    for k, a in variants.items():
        m = float(np.median(measured[k]))
        counts = [(b.qk_dim, b.v_dim, b.mlp_dim) for b in a.blocks]
        predicted = float(lat.ratio(arch, counts))
        macs_ratio = float(macs.model_macs(arch, counts) / dense_macs)
        rows.append(
            {
                "model": arch.name,
                "batch": batch,
                "variant": k,
                "measured": round(m, 4),
                "measured_range": [round(min(measured[k]), 4), round(max(measured[k]), 4)],
                "predicted": round(predicted, 4),
                "error": round(predicted / m - 1, 4),
                "macs_ratio": round(macs_ratio, 4),
                "macs_error": round(macs_ratio / m - 1, 4),
                "widths": counts,
            }
        )
    for k, floor in unreachable.items():
        rows.append({"model": arch.name, "batch": batch, "variant": k, "unreachable": floor})
    return rows, lat


def summary(rows: list[dict]) -> list[dict]:
    """Per model and batch: the median and worst |error| over the random configurations, and
    the latency each target achieved."""
    out = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["batch"]) == (model, batch)]
        rand = [r for r in mine if r["variant"].startswith("random")]
        err = np.abs([r["error"] for r in rand])
        macs_err = np.abs([r["macs_error"] for r in rand])
        row = {
            "model": model,
            "batch": batch,
            "configs": len(rand),
            "median_error": round(float(np.median(err)), 4),
            "worst_error": round(float(err.max()), 4),
            "macs_median_error": round(float(np.median(macs_err)), 4),
            "macs_worst_error": round(float(macs_err.max()), 4),
        }
        for r in mine:
            if "target" in r["variant"]:
                row[r["variant"]] = r.get("measured", f"unreachable (floor {r.get('unreachable')})")
        out.append(row)
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    s = summary(rows)
    targets = [k for k in s[0] if "target" in k]
    lines = [
        f"Latency model vs measured, {meta['dtype']}, {meta['rounds']} interleaved rounds "
        f"({meta['device']}, {meta['cpus']} CPUs); error = predicted / measured - 1 over "
        f"{s[0]['configs']} random width configurations; the MACs ratio as a predictor beside it; "
        "a target's ideal is itself (unreachable: the predicted ratio with every width at 1).",
        "",
        "| model | batch | median abs error | worst | MACs as predictor: median | worst | "
        + " | ".join(f"latency achieved, {t}" for t in targets)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(targets),
    ]
    for r in s:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['median_error']:.1%} | {r['worst_error']:.1%} "
            f"| {r['macs_median_error']:.1%} | {r['macs_worst_error']:.1%} | "
            + " | ".join(f"{r[t]:.3f}" if isinstance(r[t], float) else r[t] for t in targets)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(_):
    rows, tables = [], {}
    targets = [float(t) for t in common.TARGETS.value]
    for spec in common.MODELS.value:
        arch = common.parse_arch(spec)
        for batch in map(int, _BATCHES.value):
            new, lat = measure(
                arch,
                batch,
                _CONFIGS.value,
                targets,
                seconds=common.SECONDS.value,
                rounds=common.ROUNDS.value,
            )
            rows += new
            tables[f"{arch.name} batch {batch}"] = lat.to_json()
            print(common.table(summary(new), list(summary(new)[0])), flush=True)
    meta = {
        "dtype": "float32",
        "rounds": common.ROUNDS.value,
        "seconds": common.SECONDS.value,
        "configs": _CONFIGS.value,
        "knots": latency.KNOTS,
        "repeats": latency.REPEATS,
        "device": str(jax.devices()[0].device_kind),
        "cpus": common.cpus(),
        "latency_models": tables,
    }
    md = markdown(rows, meta)
    path = common.write(f"latency_model_{jax.default_backend()}{common.suffix()}", rows, meta, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.defaults(models=["mini4:LLSS", "S"], seconds=0.5, rounds=5)
    common.run(main)
