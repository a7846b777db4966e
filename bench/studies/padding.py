"""Exported models padded to one multiple each, and per layer shape: which is fastest?

  python -m bench.studies.padding [--root workdirs/compare] [--cells vit/amap_t0.7_s0,...]
      [--vits S:45:1099,...] [--batch 256] [--candidates 1,8,16,32,64] [--rounds 5]
      [--seconds 1] [--tag TAG]

Per model: the per-layer choice `--config.export_pad=0` makes
(`amap_jax.export_speed.fastest_multiples`: each block's attention and MLP timed alone at
every candidate, without its cache), then the whole model padded to each candidate multiple
and to that per-layer choice, interleaved in the same rounds. The best single multiple in those
rounds is the oracle the per-layer choice is judged against (an optimistic one: the best of
several noisy medians). `export_pad=0` keeps the per-layer choice only where the whole model
gains from it (`export_speed.measured`): "per layer / unpadded" below 1 means an unpadded export.
Models: finished bench.compare cells ("search freely, pad at export"; padding changes no
logit, so their top-1 stands for every variant) and ViTs with every block at `head:hidden`
widths (`--vits`, e.g. S:45:1099, what Torch-Pruning gives DeiT-S at -30% MACs).
Writes bench/results/padding_<backend>[_TAG].json and .md.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import flags

from amap_jax import export_speed, models
from amap_jax.io import pruned
from amap_jax.models.arch import vit_arch
from amap_jax.pruning import macs, padding
from bench import common, compare  # compare's --root: where its cells are

_VITS = flags.DEFINE_list("vits", [], "VARIANT:head:hidden ViTs at 224 px (random weights).")
_CANDIDATES = flags.DEFINE_list("candidates", ["1", "8", "16", "32", "64"], "Multiples.")


def _models():
    for cell, _, export in compare.finished_exports():
        model, variables = pruned.load_pruned(export)
        yield cell, model.arch, variables["params"]
    for spec in _VITS.value:
        variant, head, hidden = spec.split(":")
        arch = common.at_widths(vit_arch(variant), int(head), int(hidden))
        params = models.build(arch).init(jax.random.key(0), models.dummy_input(arch))["params"]
        yield f"ViT-{variant} {head}:{hidden}", arch, params


def measure(arch, params, batch: int, candidates: tuple[int, ...]) -> dict:
    t = time.perf_counter()
    pairs, _ = export_speed.fastest_multiples(arch, batch, candidates=candidates, cache=None)
    calibration_s = time.perf_counter() - t
    variants = {f"x{m}": padding.pad(arch, params, m) for m in candidates}
    variants["per layer"] = padding.pad(arch, params, pairs)
    ips = export_speed.rates(
        variants, batch, seconds=common.SECONDS.value, rounds=common.ROUNDS.value
    )
    return summarize(ips, {k: macs.model_macs(a) for k, (a, _) in variants.items()}, pairs) | {
        "calibration_s": round(calibration_s, 1)
    }


def summarize(ips: dict[str, list[float]], model_macs: dict[str, int], pairs) -> dict:
    """Images/s per variant (median of rounds); the per-layer choice over unpadded and over the
    best single multiple, each the median of same-round ratios."""

    def ratio(a, b):
        return round(float(np.median([x / y for x, y in zip(ips[a], ips[b], strict=True)])), 3)

    uniform = [k for k in ips if k != "per layer"]
    best = max(uniform, key=lambda k: np.median(ips[k]))
    row = {
        "per_layer_multiples": [list(p) for p in pairs],
        "best_single": best,
        "per_layer_over_unpadded": ratio("per layer", "x1") if "x1" in ips else None,
        "per_layer_over_best_single": ratio("per layer", best),
        "best_single_over_unpadded": ratio(best, "x1") if "x1" in ips else None,
    }
    for k, v in ips.items():
        row[f"{k} img/s"] = round(float(np.median(v)), 1)
        row[f"{k} MACs"] = int(model_macs[k])
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | images/s per single multiple | best single | per layer (attention/MLP "
        "multiples per block) | per layer / unpadded | per layer / best single | calibration | "
        "export_pad=0 keeps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        singles = ", ".join(
            f"{k.split()[0]} {_rate(v)}"
            for k, v in r.items()
            if k.endswith(" img/s") and not k.startswith("per layer")
        )
        multiples = " ".join(f"{a}/{m}" for a, m in r["per_layer_multiples"])
        lines.append(
            f"| {r['model']} | {singles} | {r['best_single']} | {_rate(r['per layer img/s'])} "
            f"({multiples}) | {r['per_layer_over_unpadded']:.2f}x | "
            f"{r['per_layer_over_best_single']:.2f}x | {r['calibration_s']:.0f} s | "
            f"{'per layer' if r['per_layer_over_unpadded'] > 1 else 'unpadded'} |"
        )
    return "\n".join(lines) + "\n"


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def main(_):
    rows, candidates = [], tuple(int(c) for c in _CANDIDATES.value)
    for name, arch, params in _models():
        row = {
            "model": name,
            "widths (qk, v, mlp) per block": [[b.qk_dim, b.v_dim, b.mlp_dim] for b in arch.blocks],
            **measure(arch, params, common.BATCH.value, candidates),
        }
        rows.append(row)
        print(row, flush=True)
    name = f"padding_{jax.default_backend()}{common.suffix()}"
    meta = {"batch": common.BATCH.value, "rounds": common.ROUNDS.value}
    md = markdown(rows)
    path = common.write(name, rows, meta | {"seconds": common.SECONDS.value}, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.defaults(batch=256, seconds=1.0)
    common.run(main)
