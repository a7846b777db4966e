"""What a run measures on the backend it is on: the export's padding, CPU kernel set and token
groups, and the latency model a latency target charges.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from amap_jax import export_speed, latency, xla_cpu
from amap_jax import workdir as workdir_lib
from amap_jax.io import paths, pruned, trees
from amap_jax.logs import log as logging
from amap_jax.models import tokens
from amap_jax.models.arch import Arch
from amap_jax.pipeline.context import Context
from amap_jax.pruning import cost as cost_lib
from amap_jax.pruning import macs, padding
from amap_jax.train import checkpoint, parallel, stop
from amap_jax.train import evaluate as evaluate_lib


def pad(ctx: Context, arch: Arch, params):
    """The fine-tuned export padded to `export_pad`; 0: whatever runs fastest here as a whole
    model, of unpadded, padded per layer shape and padded to one multiple (`export_speed.measured`),
    chosen by process 0 for all."""
    multiple = ctx.config.export_pad
    if multiple == 0:
        batch = ctx.config.eval.bench_batch
        choice, report = export_speed.measured(arch, params, batch)
        pairs = padding.per_block(arch, choice)
        pairs = [tuple(p) for p in parallel.broadcast(np.asarray(pairs)).tolist()]
        multiple = 1 if all(p == (1, 1) for p in pairs) else pairs
        for shape, m in report["shapes"].items():
            rates = ", ".join(f"x{k}: {v:.0f}" for k, v in m["images_per_s"].items())
            logging.info("export padding, %s: %s images/s", shape.split("|")[-1], rates)
        gains = ", ".join(f"{k}: {v:.2f}x" for k, v in report["gains"].items())
        logging.info(
            "export padding, whole model over unpadded (per layer: %s): %s; chose %s",
            report["per_layer"],
            gains or "nothing to pad",
            report["choice"],
        )
    return (*padding.pad(arch, params, multiple), multiple)


def kernels(ctx: Context, arch: Arch, params) -> str:
    """The CPU kernel set `arch` is compiled with (`cpu_kernels`); "measure": the fastest here
    as a whole model (`export_speed.fastest_kernels`), chosen by process 0 for all."""
    name = ctx.config.cpu_kernels
    if name != "measure":
        return name
    name, gains = export_speed.fastest_kernels(arch, params, ctx.config.eval.bench_batch)
    logging.info(
        "CPU kernels of %s: %s; chose %s",
        arch.name,
        ", ".join(f"{k}: {v:.2f}x" for k, v in gains.items()) or "one set usable",
        name,
    )
    names = list(xla_cpu.SETS)
    return names[int(parallel.broadcast(np.asarray(names.index(name))))]


def bench_images(ctx: Context):
    """Test images a token export is timed on: what is kept depends on the image."""
    n = max(ctx.config.eval.bench_batch, 64)
    return ctx.inputs(jnp.asarray(ctx.test.calibration_images(n)))


def token_groups(ctx: Context, arch: Arch, params) -> Arch:
    """`arch` with the parts its dropping forward runs a batch in: 0 (`asvit.groups`) becomes
    1 or `tokens.GROUPS`, whichever runs faster here at the bench batch, chosen by process 0
    for all."""
    if getattr(arch, "token_groups", 1) != 0:
        return arch
    bench, model = ctx.config.eval, ctx.build(arch)
    images = bench_images(ctx)
    rates = {
        g: evaluate_lib.token_throughput(
            model, {"params": params}, images, bench.bench_batch, groups=g, seconds=1.0
        )
        for g in (1, tokens.GROUPS)
    }
    choice = int(parallel.broadcast(np.asarray(max(rates, key=rates.get))))
    logging.info(
        "token groups at batch %d: %s; chose %d",
        bench.bench_batch,
        ", ".join(f"{g}: {r:.0f} images/s" for g, r in rates.items()),
        choice,
    )
    return arch.replace(token_groups=choice)


LATENCY_FILE = "latency.json"


def budget_cost(ctx: Context, arch: Arch) -> cost_lib.Cost:
    """What `search.target` is a ratio of: MACs, or the latency model of this backend
    (`amap_jax.latency`), process 0's for all and kept in the work directory, so that a
    resumed run charges what it started with."""
    s = ctx.config.search
    if s.budget_kind == "macs":
        return cost_lib.MACS
    path = paths.join(ctx.workdir, LATENCY_FILE)
    if paths.exists(path):
        return cost_lib.Latency.from_json(trees.read_json(path))
    model = latency.measure(arch, s.latency_batch, ctx.config.model.dtype)
    model = model.with_values(parallel.broadcast(model.values()))
    if ctx.is_chief:
        checkpoint.write_json(path, model.to_json())
    dense = float(model.model(arch))
    logging.info(
        "latency model at batch %d (%s): dense %.3f ms, %.3f ms of it outside the blocks",
        s.latency_batch,
        model.dtype,
        dense * 1e3,
        model.constant * 1e3,
    )
    return model


def export(ctx: Context, arch: Arch, p_arch: Arch, p_params, export_dir: str):
    """Saves the fine-tuned export, tuned for this backend (padding, CPU kernels, token
    groups), once: a finished export is read back, not redone. Returns (model, variables,
    padding multiple) of what was exported."""
    config = ctx.config
    parallel.barrier("before export")  # every process sees the same is_finished
    if not pruned.is_finished(export_dir):  # every process takes part in the save
        if ctx.is_chief:
            workdir_lib.record(ctx.workdir, config, "export")
            workdir_lib.mark_export(ctx.workdir, export_dir)  # ours before it is finished
        padded_arch, padded_params, multiple = pad(ctx, p_arch, p_params)
        kernel_set = kernels(ctx, padded_arch, padded_params)
        padded_arch = token_groups(ctx, padded_arch, padded_params)
        stop.check()
        pruned.save_pruned(
            export_dir,
            padded_arch,
            padded_params,
            class_names=ctx.train.info.class_names,
            method=config.method,
            dense_macs=int(macs.model_macs(arch)),
            export_pad=multiple,
            cpu_kernels=kernel_set,
            cpu_compiler_options=xla_cpu.SETS[kernel_set],  # for loaders without amap_jax
        )
    if config.export_artifact and ctx.is_chief and not pruned.has_artifact(export_dir):
        pruned.add_artifact(export_dir)  # deployable with jax alone
    parallel.barrier("artifact written")
    model, loaded = pruned.load_pruned(export_dir)
    return model, loaded, pruned.read_meta(export_dir).get("export_pad", 1)
