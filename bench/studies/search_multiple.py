"""Search with `amap.multiple` or search freely and pad at export: accuracy and speed.

  python -m bench.studies.search_multiple [--free workdirs/compare_free]
      [--multiple workdirs/compare_mult8]
      [--configs vit,flatten] [--targets 0.7,0.5] [--seeds 0,1] [--pad 8] [--batch 256]
      [--rounds 5] [--seconds 1] [--tag TAG]

Both roots are bench.compare grids of the `amap` method on the same dense checkpoints, seeds and
schedule, one run with `--set amap.multiple=8`. Accuracy: top-1 mean and sd over the seeds of
each root's finished cells (padding changes no logit: the free export's top-1 holds padded).
Speed: seed 0's exports, the dense model, the free export unpadded, padded to `--pad`, and padded
as `export_pad=0` pads it when that differs (`export_speed.measured`: per layer shape or one
multiple, whichever whole model runs fastest here), and the export searched with the multiple,
interleaved in rounds; speedups are over the dense model in the same round. Writes
bench/results/search_multiple_<backend>[_TAG].json and .md.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import flags

from amap_jax import export_speed, models
from amap_jax.io import pruned
from amap_jax.pruning import macs, padding
from amap_jax.train import checkpoint
from bench import common, compare  # compare's --configs, --targets, --seeds (speed: the first)

_FREE = flags.DEFINE_string("free", "workdirs/compare_free", "Grid searched freely.")
_MULTIPLE = flags.DEFINE_string("multiple", "workdirs/compare_mult8", "Grid with amap.multiple.")
_PAD = flags.DEFINE_integer("pad", 8, "The multiple the grid searched with.")


def _cells(root: str, config: str, target: float) -> list[tuple[str, dict]]:
    out = []
    for seed in compare._SEEDS.value:
        path = os.path.join(root, config, compare._cell_name("amap", target, int(seed)))
        if os.path.exists(os.path.join(path, "cell.json")):
            out.append((path, checkpoint.read_json(os.path.join(path, "cell.json"))))
    return out


def main(_):
    rows = []
    for config in compare._CONFIGS.value:
        d_arch = compare.pipeline_arch(config)
        d_params = models.build(d_arch).init(jax.random.key(0), models.dummy_input(d_arch))
        dense_macs = macs.model_macs(d_arch)
        for target in map(float, common.TARGETS.value):
            free, mult = (
                _cells(_FREE.value, config, target),
                _cells(_MULTIPLE.value, config, target),
            )
            if not free or not mult:
                print(f"skipped {config} {target}: unfinished cells")
                continue
            (f_model, f_vars), (m_model, m_vars) = (
                pruned.load_pruned(os.path.join(c[0][0], "export")) for c in (free, mult)
            )
            f_arch, m_arch = f_model.arch, m_model.arch
            best, report = export_speed.measured(
                f_arch,
                f_vars["params"],
                common.BATCH.value,
                seconds=common.SECONDS.value,
                cache=None,
            )
            variants = {
                "dense": (d_arch, d_params["params"]),
                "free": (f_arch, f_vars["params"]),
                f"free, padded x{_PAD.value}": padding.pad(f_arch, f_vars["params"], _PAD.value),
                f"searched with multiple {_PAD.value}": (m_arch, m_vars["params"]),
            }
            if best not in (1, _PAD.value):
                variants[f"free, padded {report['choice']} (export_pad=0)"] = padding.pad(
                    f_arch, f_vars["params"], best
                )
            ips = export_speed.rates(
                variants,
                common.BATCH.value,
                seconds=common.SECONDS.value,
                rounds=common.ROUNDS.value,
            )
            top1 = {
                "free": [c["top1"] for _, c in free],
                f"searched with multiple {_PAD.value}": [c["top1"] for _, c in mult],
            }
            for name, (arch, _) in variants.items():
                if name == "dense":
                    continue
                free_side = name.startswith("free")
                rows.append(
                    row(
                        config,
                        target,
                        name,
                        arch,
                        searched=f_arch if free_side else m_arch,
                        top1=top1["free" if free_side else name],
                        speedups=[p / d for p, d in zip(ips[name], ips["dense"], strict=True)],
                        dense_macs=dense_macs,
                    )
                )
                print(rows[-1], flush=True)
    meta = {"batch": common.BATCH.value, "rounds": common.ROUNDS.value, "pad": _PAD.value}
    name = f"search_multiple_{jax.default_backend()}{common.suffix()}"
    md = markdown(rows)
    common.write(name, rows, meta, md)
    print(md)


def row(config, target, name, arch, *, searched, top1, speedups, dense_macs) -> dict:
    """One table row: `arch` is the timed model (pads counted in its MACs), `searched` the
    search's widths (the ideal speedup), `top1` one value per seed, `speedups` one per round."""
    return {
        "config": config,
        "target": target,
        "variant": name,
        "top1_mean": round(float(np.mean(top1)), 2),
        "top1_sd": round(float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0, 2),
        "seeds": len(top1),
        "macs_ratio": round(macs.model_macs(arch) / dense_macs, 3),
        "ideal_speedup": round(dense_macs / macs.model_macs(searched), 3),
        "speedup": round(float(np.median(speedups)), 3),
        "speedup_range": [round(min(speedups), 3), round(max(speedups), 3)],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| config | MACs target | variant | top-1 (mean ± sd) | MACs ratio (pads counted) | "
        "speedup (range) | ideal (dense / searched MACs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['target']} | {r['variant']} | {r['top1_mean']:.2f} ± "
            f"{r['top1_sd']:.2f} | {r['macs_ratio']:.3f} | {r['speedup']:.2f}x "
            f"({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}) | "
            f"{r['ideal_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.defaults(batch=256, seconds=1.0)
    common.run(main)
