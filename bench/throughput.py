"""Exported (pruned) vs dense inference throughput, with the ideal MACs ratio beside it.

  python -m bench.throughput [--models Ti,S:LLLLLLSSSSSS,flatten_swin_tiny_patch4_224]
      [--batch 32] [--targets 0.7,0.5]

Models have random weights: speed does not depend on the values. Writes
bench/results/throughput_<backend>.json.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from amap_jax import models
from amap_jax.methods import Amap
from amap_jax.pruning.macs import model_macs
from bench import common

_FLOOR = flags.DEFINE_float(
    "min_keep_fraction", 0.0, "Per-head floor of kept channels (amap.min_keep_fraction)."
)


def main(_):
    rows = []
    for spec in common.MODELS.value:
        arch = common.parse_arch(spec)
        fwd = jax.jit(models.build(arch).apply)
        x = jnp.ones((common.BATCH.value, arch.image_size, arch.image_size, arch.in_chans))
        t_dense = None
        for target in map(float, common.TARGETS.value):
            method = Amap(min_keep_fraction=_FLOOR.value)
            _, params, p_arch, p_params = common.dense_and_pruned(arch, target, method=method)
            if t_dense is None:  # one dense timing per model, shared by its targets
                t_dense = common.time_fn(fwd, {"params": params}, x, seconds=common.SECONDS.value)
            p_fwd = jax.jit(models.build(p_arch).apply)
            t_pruned = common.time_fn(p_fwd, {"params": p_params}, x, seconds=common.SECONDS.value)
            ideal = model_macs(arch) / model_macs(p_arch)
            speedup = t_dense / t_pruned
            rows.append(
                {
                    "model": arch.name,
                    "target": target,
                    "dense_img_s": round(common.BATCH.value / t_dense, 1),
                    "pruned_img_s": round(common.BATCH.value / t_pruned, 1),
                    "speedup": round(speedup, 3),
                    "ideal": round(ideal, 3),
                    "efficiency": round(speedup / ideal, 3),
                }
            )
            print(common.table(rows[-1:], list(rows[-1])), flush=True)
    name = f"throughput_{jax.default_backend()}" + common.suffix()
    meta = {"batch": common.BATCH.value, "dtype": "float32", "min_keep_fraction": _FLOOR.value}
    path = common.write(name, rows, meta)
    print(common.table(rows, list(rows[0])))
    print(f"wrote {path}")


if __name__ == "__main__":
    common.defaults(models=["Ti", "Ti:LLLLLLSSSSSS", "S", "S:LLLLLLSSSSSS"], batch=32, seconds=5.0)
    app.run(main)
