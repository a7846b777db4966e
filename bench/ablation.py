"""AMAP ablation on a finished run: which component buys what, and the floors to beat.

  python -m bench.ablation --workdir workdirs/fmnist_flatten

Reuses the run's config and its trained dense model; for every variant it searches again (in a
scratch directory) and reports the top-1 of the masked model right after the search, before any
fine-tuning, at the same MACs target. Magnitude and random pruning keep exactly the per-head
widths AMAP found, so they differ from it only in *which* channels they keep.
Writes bench/results/ablation_<dataset>_<pattern>.json.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import ml_collections
import numpy as np
from absl import app, flags

from amap_jax import logs, pipeline
from amap_jax.models.block import INDICATORS
from amap_jax.models.vit import ViT
from amap_jax.pruning import amap, export, macs, similarity
from amap_jax.pruning.projection import PruneSpec, fixed_logits
from amap_jax.train import checkpoint
from bench import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a finished run.")
_EPOCHS = flags.DEFINE_float("epochs", None, "Search epochs (default: the run's).")
flags.mark_flag_as_required("workdir")

VARIANTS = {
    "amap": {},
    "init=constant": {"init": "constant"},
    "init=attn_diff(all)": {"init": "attn_diff", "init_on_softmax": True},
    "no similarity": {"similarity": False},
    "no reweight": {"reweight": False},
}


def _floor(arch, params, widths_from, rng, kind):
    """Fixed logits keeping `widths_from`'s per-head counts, chosen by magnitude or at random."""
    out = {}
    for i, b in enumerate(arch.blocks):
        desc = similarity.descriptors(params[f"block_{i}"], b.heads)
        out[f"block_{i}"] = {}
        for g, d in desc.items():
            k = int(np.asarray(widths_from[f"block_{i}"][g] > 0).sum(-1)[0])
            score = (
                np.abs(np.asarray(d)).sum(-1) if kind == "magnitude" else rng.random(d.shape[:2])
            )
            keep = np.argsort(np.argsort(-score, axis=-1), axis=-1) < k
            out[f"block_{i}"][g] = fixed_logits(keep)
    return out


def main(_):
    logs.setup()
    config = ml_collections.ConfigDict(
        checkpoint.read_json(os.path.join(_WORKDIR.value, "config.json"))
    )
    if _EPOCHS.value is not None:
        config.search.epochs = _EPOCHS.value
    ctx, arch = pipeline.make_context(config, _WORKDIR.value)
    dense = pipeline.train_dense(ctx, arch)  # finished: restored, not retrained
    dense_top1 = ctx.evaluate(ViT(arch), {"params": dense})["top1"]
    rows, amap_indicators = [], None
    for name, overrides in VARIANTS.items():
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.search.update(overrides)
        with tempfile.TemporaryDirectory() as scratch:
            vctx = dataclasses.replace(ctx, config=cfg, workdir=scratch)
            s_arch, variables, model = pipeline.search(vctx, arch, dense)
            top1 = vctx.evaluate(model, variables)["top1"]
        p_arch, _ = export.export(s_arch, variables, pipeline.prune_spec(cfg.search))
        if name == "amap":
            amap_indicators = variables[INDICATORS]
        rows.append(
            {
                "variant": name,
                "masked_top1": round(top1, 2),
                "macs_ratio": round(macs.model_macs(p_arch) / macs.model_macs(arch), 4),
            }
        )
        print(common.table(rows[-1:], list(rows[-1])), flush=True)
    rng = np.random.default_rng(0)
    model = ViT(arch, prune=PruneSpec())
    for kind in ("magnitude", "random"):
        ind = _floor(arch, dense, amap_indicators, rng, kind)
        top1 = ctx.evaluate(model, {"params": dense, INDICATORS: ind})["top1"]
        ratio = amap.hard_ratio(arch, {INDICATORS: ind}, PruneSpec())
        rows.append(
            {
                "variant": f"{kind} (AMAP's widths)",
                "masked_top1": round(top1, 2),
                "macs_ratio": round(ratio, 4),
            }
        )
        print(common.table(rows[-1:], list(rows[-1])), flush=True)
    name = f"ablation_{config.data.name}_{arch.pattern}"
    path = common.write(
        name,
        rows,
        {
            "dense_top1": dense_top1,
            "target": config.search.target,
            "search_epochs": config.search.epochs,
            "workdir": os.path.abspath(_WORKDIR.value),
        },
    )
    print(f"dense top-1 {dense_top1:.2f}; masked top-1 after search, no fine-tuning:")
    print(common.table(rows, list(rows[0])))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
