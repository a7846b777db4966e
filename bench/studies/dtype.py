"""bfloat16 vs float32: top-1 and images/s of exported Fashion-MNIST models, and the speed of a
dense and a pruned ViT-S/16 at 224 px.

  python -m bench.studies.dtype [--root workdirs/compare] [--cells vit/amap_t0.7_s0,...]
      [--batch 256] [--vit_batch 32] [--rounds 5] [--seconds 2] [--tag TAG]

`--config.model.dtype=bfloat16` casts the inputs and every activation to bf16; parameters stay
float32 (cast to bf16 where they are used), the matmuls take bf16 operands (XLA accumulates in
float32 inside a bf16 dot on CPU, GPU and TPU, and rounds the output to bf16), and the softmax,
the LayerNorm statistics and the logits are float32. Each model is timed in both dtypes in
interleaved rounds; the median is reported. Writes bench/results/dtype_<backend>[_TAG].json.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from amap_jax import models
from amap_jax.data.splits import open_split
from amap_jax.io import pruned
from amap_jax.timing import interleaved
from amap_jax.train import parallel, steps
from amap_jax.train.evaluate import evaluate
from bench import common, compare  # compare's --root: where its cells are

_VIT_BATCH = flags.DEFINE_integer("vit_batch", 32, "Batch for ViT-S/16 at 224 px (0: skip).")


def _speeds(arch, params, batch: int) -> dict[str, float]:
    x = jax.random.normal(
        jax.random.key(0), (batch, arch.image_size, arch.image_size, arch.in_chans)
    )
    fns = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        fwd = jax.jit(models.build(arch, dtype=dtype).apply)
        fns[name] = lambda fwd=fwd: jax.block_until_ready(fwd({"params": params}, x))
    got = interleaved(fns, common.SECONDS.value, common.ROUNDS.value, batch)
    return {k: float(np.median(v)) for k, v in got.items()}


def exported_rows() -> list[dict]:
    rows = []
    mesh = parallel.make_mesh(1)
    for cell, name, export in compare.finished_exports():
        config = compare.load_config(name)
        test = open_split(config.data, config.data.test_split)
        model, variables = pruned.load_pruned(export)
        arch = model.arch
        inputs = steps.Input(arch.mean, arch.std, arch.image_size)
        top1 = {}
        for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            m = models.build(arch, dtype=dtype)
            batches = test.eval_batches(config.eval.batch_size)
            top1[dtype_name] = evaluate(m, variables, batches, inputs, mesh)["top1"]
        rows.append(_row(cell, arch, variables["params"], common.BATCH.value, top1))
    return rows


def vit_rows() -> list[dict]:
    if not _VIT_BATCH.value:
        return []
    dense = common.parse_arch("S")
    rows = []
    for label, arch in (
        ("ViT-S/16 dense", dense),
        ("ViT-S/16 at 45:1099", common.at_widths(dense, 45, 1099)),
    ):
        params = models.build(arch).init(jax.random.key(0), models.dummy_input(arch))["params"]
        rows.append(_row(label, arch, params, _VIT_BATCH.value))
    return rows


def _row(label: str, arch, params, batch: int, top1: dict | None = None) -> dict:
    speed = _speeds(arch, params, batch)
    row = {"model": label, "batch": batch}
    if top1:
        row.update(
            top1_float32=round(top1["float32"], 2),
            top1_bfloat16=round(top1["bfloat16"], 2),
            top1_change=round(top1["bfloat16"] - top1["float32"], 2),
        )
    row.update(
        img_s_float32=round(speed["float32"], 1),
        img_s_bfloat16=round(speed["bfloat16"], 1),
        bf16_speedup=round(speed["bfloat16"] / speed["float32"], 3),
    )
    print(row, flush=True)
    return row


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags_line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags_line.split() if "bf16" in f or f in ("avx512f", "amx_tile"))


def main(_):
    rows = exported_rows() + vit_rows()
    meta = {
        "rounds": common.ROUNDS.value,
        "seconds": common.SECONDS.value,
        "cpu_flags": _cpu_flags(),
    }
    path = common.write(f"dtype_{jax.default_backend()}{common.suffix()}", rows, meta)
    print(f"CPU bf16-related flags: {meta['cpu_flags'] or 'none'}")
    print(
        "| model | batch | top-1 fp32 | top-1 bf16 | change | img/s fp32 | img/s bf16 "
        "| bf16 / fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r.get('top1_float32', '-')} | "
            f"{r.get('top1_bfloat16', '-')} | {r.get('top1_change', '-')} | {r['img_s_float32']} "
            f"| {r['img_s_bfloat16']} | {r['bf16_speedup']:.2f}x |"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    common.defaults(batch=256, seconds=2.0)
    common.run(main)
