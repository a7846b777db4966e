"""Exported (pruned) vs dense inference throughput, with the ideal MACs ratio beside it.

  python -m bench.throughput [--models Ti,S:LLLLLLSSSSSS,flatten_swin_tiny_patch4_224]
      [--batch 32] [--targets 0.7,0.5] [--rounds 5] [--seconds 4] [--kernels measure]
      [--budget_kinds macs,latency]

Per model, the dense model and its AMAP exports at each target are timed in the same rounds
(interleaved), each compiled with its CPU kernel set (`--kernels`; "measure": the fastest for
that model, as `cpu_kernels=measure` picks it). A speedup is the median over rounds of the
export's images/s over the dense model's in the same round, with the range over rounds. Models
have random weights: speed does not depend on the values. With `--budget_kinds macs,latency`
each target is also met as a share of the latency model's prediction at the bench's batch
(`search.budget_kind=latency`; the ideal is then 1 / target). Writes
bench/results/throughput_<backend>[_TAG].json and .md.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import flags

from amap_jax import export_speed, latency
from amap_jax.methods import Amap
from amap_jax.pruning import cost
from amap_jax.pruning.macs import model_macs
from bench import common

_MIN_KEEP_FRACTION = flags.DEFINE_float(
    "min_keep_fraction",
    0.0,
    "Per-head minimum of kept channels as a share of the width (amap.min_keep_fraction).",
    lower_bound=0.0,
    upper_bound=1.0,
)
_KINDS = flags.DEFINE_list(
    "budget_kinds", ["macs"], "What a target is a share of: macs, latency (search.budget_kind)."
)


def measure(
    arch,
    targets,
    *,
    batch: int,
    seconds: float,
    rounds: int,
    kernels: str,
    min_keep_fraction: float = 0.0,
    kinds=("macs",),
) -> list[dict]:
    """One row per target and budget kind: the dense model `arch` against its export there."""
    models, ideal = {}, {}
    for kind in kinds:
        method = Amap(min_keep_fraction=min_keep_fraction)
        if kind == "latency":
            method = dataclasses.replace(method, cost=latency.measure(arch, batch))
        for target in targets:
            _, params, p_arch, p_params = common.dense_and_pruned(arch, target, method=method)
            models.setdefault("dense", (arch, params))  # one seed: the same dense model
            key = target if kind == "macs" else (target, kind)
            models[key] = (p_arch, p_params)
            ideal[key] = model_macs(arch) / model_macs(p_arch) if kind == "macs" else 1 / target
    sets = {name: common.kernel_set(a, p, batch, kernels) for name, (a, p) in models.items()}
    ips = export_speed.rates(
        {name: (*m, sets[name]) for name, m in models.items()},
        batch,
        seconds=seconds,
        rounds=rounds,
    )
    rows = []
    for target in ideal:
        ratios = [p / d for p, d in zip(ips[target], ips["dense"], strict=True)]
        speedup = float(np.median(ratios))
        rows.append(
            {
                "model": arch.name,
                "target": target if isinstance(target, float) else f"{target[0]} latency",
                "dense_img_s": round(float(np.median(ips["dense"])), 1),
                "pruned_img_s": round(float(np.median(ips[target])), 1),
                "speedup": round(speedup, 3),
                "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
                "ideal": round(ideal[target], 3),
                "efficiency": round(speedup / ideal[target], 3),
                "kernels": f"{sets['dense']} / {sets[target]}",
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Exported vs dense, batch {meta['batch']}, {meta['dtype']}, {meta['rounds']} interleaved "
        f"rounds ({meta['device']}, {meta['cpus']} CPUs)",
        "",
        "| model | target | dense img/s | exported img/s | speedup (range) | ideal "
        "| efficiency | CPU kernels (dense / exported) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["speedup_range"]
        lines.append(
            f"| {r['model']} | {r['target']} | {r['dense_img_s']:.1f} | {r['pruned_img_s']:.1f} "
            f"| {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['ideal']:.2f}x "
            f"| {r['efficiency']:.2f} | {r['kernels']} |"
        )
    return "\n".join(lines) + "\n"


def main(_):
    unknown = sorted(set(_KINDS.value) - set(cost.KINDS))
    if unknown:
        raise ValueError(f"--budget_kinds: {unknown} are not among {', '.join(cost.KINDS)}")
    rows, targets = [], [float(t) for t in common.TARGETS.value]
    for spec in common.MODELS.value:
        rows += measure(
            common.parse_arch(spec),
            targets,
            batch=common.BATCH.value,
            seconds=common.SECONDS.value,
            rounds=common.ROUNDS.value,
            kernels=common.KERNELS.value,
            min_keep_fraction=_MIN_KEEP_FRACTION.value,
            kinds=_KINDS.value,
        )
        n = len(targets) * len(_KINDS.value)
        print(common.table(rows[-n:], list(rows[-1])), flush=True)
    meta = {
        "batch": common.BATCH.value,
        "dtype": "float32",
        "rounds": common.ROUNDS.value,
        "seconds": common.SECONDS.value,
        "kernels": common.KERNELS.value,
        "min_keep_fraction": _MIN_KEEP_FRACTION.value,
        "budget_kinds": _KINDS.value,
        "device": str(jax.devices()[0].device_kind),
        "cpus": common.cpus(),
    }
    md = markdown(rows, meta)
    path = common.write(f"throughput_{jax.default_backend()}{common.suffix()}", rows, meta, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.defaults(models=["Ti", "Ti:LLLLLLSSSSSS", "S", "S:LLLLLLSSSSSS"], batch=32, seconds=4.0)
    common.run(main)
