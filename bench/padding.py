"""Exported models padded to each candidate multiple: images/s per multiple, the one chosen.

  python -m bench.padding [--root workdirs/compare] [--cells vit/amap_t0.7_s0,...]
      [--batch 256] [--candidates 1,8,16,32,64] [--rounds 5] [--seconds 1] [--tag TAG]

The measurement `--config.export_pad=0` makes (`amap_jax.pruning.padding.fastest_multiple`), on
finished bench.compare cells ("search freely, pad at export"), without its cache. Padding never
changes a logit, so the cells' top-1 stands for every multiple. Writes
bench/results/padding_<backend>[_TAG].json.
"""

from __future__ import annotations

import jax
from absl import app, flags

from amap_jax.io import pruned
from amap_jax.pruning import macs, padding
from bench import common, compare  # compare's --root: where its cells are

_CELLS = flags.DEFINE_list(
    "cells",
    ["vit/amap_t0.7_s0", "vit/amap_t0.5_s0", "flatten/amap_t0.7_s0", "flatten/amap_t0.5_s0"],
    "CONFIG/CELL of finished compare cells.",
)
_CANDIDATES = flags.DEFINE_list("candidates", ["1", "8", "16", "32", "64"], "Multiples.")


def main(_):
    rows = []
    for cell, _, export in compare.finished_exports(_CELLS.value):
        model, variables = pruned.load_pruned(export)
        arch = model.arch
        best, speeds = padding.fastest_multiple(
            arch,
            variables["params"],
            common.BATCH.value,
            candidates=tuple(int(c) for c in _CANDIDATES.value),
            seconds=common.SECONDS.value,
            rounds=common.ROUNDS.value,
            cache=None,
        )
        row = {
            "model": cell,
            "widths (qk, v, mlp) per block": [[b.qk_dim, b.v_dim, b.mlp_dim] for b in arch.blocks],
            "fastest": best,
            "gain_over_unpadded": round(speeds[best] / speeds[1], 3) if 1 in speeds else None,
        }
        for m, v in speeds.items():
            row[f"x{m} img/s"] = round(v, 1)
            row[f"x{m} MACs"] = int(macs.model_macs(padding.pad(arch, variables["params"], m)[0]))
        rows.append(row)
        print(row, flush=True)
    path = common.write(
        f"padding_{jax.default_backend()}{common.suffix()}",
        rows,
        {
            "batch": common.BATCH.value,
            "rounds": common.ROUNDS.value,
            "seconds": common.SECONDS.value,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    common.timing_defaults(batch=256, seconds=1.0)
    app.run(main)
