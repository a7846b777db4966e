"""The stages of a run, one function each: train the dense model, search, fine-tune (and the
checks around them). Each checkpoints in its own sub-directory of the work directory and
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from amap_jax import methods, models
from amap_jax.io import paths, pretrained
from amap_jax.logs import log as logging
from amap_jax.methods import Method
from amap_jax.models import tokens
from amap_jax.models.arch import Arch
from amap_jax.pipeline import tuning
from amap_jax.pipeline.context import Context, count_params, optimizer
from amap_jax.pruning import macs
from amap_jax.train import checkpoint, parallel, scalars, steps

FIXUP_WARNING = 0.02  # a fix-up that removes more than this share of the dense MACs is warned


def dense_params(ctx: Context, arch: Arch):
    """Imported pretrained weights, or a fresh initialisation."""
    path = ctx.config.model.checkpoint
    if path:
        _, variables = pretrained.import_pretrained(path, arch)
        logging.info("imported %s weights from %s", arch.name, path)
        return variables["params"]
    model = models.build(arch)
    return model.init(jax.random.key(ctx.config.seed), models.dummy_input(arch))["params"]


def train_dense(ctx: Context, arch: Arch):
    cfg = ctx.config.train
    model = ctx.build(arch)
    params = dense_params(ctx, arch)
    total, per_epoch = ctx.steps(cfg)
    if total == 0:
        return jax.device_get(params)
    tx = optimizer(cfg, total, per_epoch)
    state = steps.create_state({"params": params}, tx)
    objective = ctx.objective(arch, cfg)
    step = ctx.compile(model, tx, objective, ctx.config.seed)
    state = ctx.fit(
        "train", "dense", cfg, state, step, ctx.config.seed, on_epoch=ctx.test_top1(model)
    )
    return jax.device_get(state.trainable["params"])  # host copy: later steps donate buffers


def search(ctx: Context, arch: Arch, dense_params, method: Method):
    """The method's search: its collections trained with the weights, then its final
    multipliers fixed. Returns (variables, masked model, {"search_end": MACs ratio of the
    search's own result, "fixup": the dense-MACs share the final fix removed (negative:
    added)}); None where a
    method's widths come from a rule, not from the search (VTP's threshold)."""
    cfg = ctx.config.search
    seed = ctx.config.seed + 1
    variables = method.initialize(arch, dense_params, calibration=ctx.calibration, seed=seed)
    variables = parallel.broadcast(variables)  # host-computed: the same on every process
    trainable_names = ("params", *method.trainable)
    total, per_epoch = ctx.steps(cfg)
    tx = optimizer(cfg, total, per_epoch, method.optimizers(total, arch))
    trainable = {k: variables[k] for k in trainable_names}
    extra = {k: v for k, v in variables.items() if k not in trainable_names}
    state = steps.create_state(trainable, tx, extra)
    model = ctx.build(arch, method)
    objective = ctx.objective(
        arch,
        cfg,
        kd_weight=cfg.kd_weight,
        kd_temperature=cfg.kd_temperature,
        regularizer=method.loss(arch, total),
    )
    teacher = ctx.build(arch) if cfg.kd_weight > 0 else None
    step = ctx.compile(model, tx, objective, seed, teacher)

    def on_epoch(_, st):
        now = {**jax.device_get(st.trainable), **jax.device_get(st.extra)}
        return method.progress(arch, now)

    if total:
        state = ctx.fit(
            "search",
            "search",
            cfg,
            state,
            step,
            seed,
            hooks=method.hooks(arch, ctx.calibration),
            on_epoch=on_epoch,
            step_args=({"params": dense_params},) if teacher else (),
        )
    variables = {**jax.device_get(state.trainable), **jax.device_get(state.extra)}
    search_end = method.search_ratio(arch, variables, ctx.calibration)
    report = method.report(arch, variables)
    final = parallel.broadcast(method.finalize(arch, variables, ctx.calibration))
    fixed = method.search_ratio(arch, final, ctx.calibration)
    ends = {
        "search_end": None if search_end is None else round(search_end, 4),
        "fixup": None if search_end is None else round(search_end - fixed, 4),
    }
    return final, model, {**ends, **({"report": report} if report else {})}


def finetune(
    ctx: Context,
    arch: Arch,
    params,
    teacher_arch: Arch,
    teacher_params,
    stage=None,
    directory: str = "finetune",
):
    """Fine-tunes (distilled from the teacher) with `stage` (default the config's `finetune`
    section), checkpointing in WORKDIR/`directory`; test top-1 after every epoch."""
    cfg = stage or ctx.config.finetune
    model = ctx.build(arch)
    total, per_epoch = ctx.steps(cfg)
    if total == 0:
        return params
    tx = optimizer(cfg, total, per_epoch)
    state = steps.create_state({"params": params}, tx)
    objective = ctx.objective(arch, cfg, kd_weight=cfg.kd_weight, kd_temperature=cfg.kd_temperature)
    teacher = ctx.build(teacher_arch) if cfg.kd_weight > 0 else None
    step = ctx.compile(model, tx, objective, ctx.config.seed + 2, teacher)
    state = ctx.fit(
        directory,
        directory,
        cfg,
        state,
        step,
        ctx.config.seed + 2,
        on_epoch=ctx.test_top1(model),
        step_args=({"params": teacher_params},) if teacher else (),
    )
    return jax.device_get(state.trainable["params"])


def finetune_curve(
    workdir: str, stage: str = "finetune", key: str = "test_top1"
) -> list[list[float]]:
    """[[epoch, top-1], ...] of a stage (`key`: test_top1 or val_top1), as its scalars recorded
    them (every epoch)."""
    rows = [r for r in scalars.read(workdir) if r["stage"] == stage and key in r]
    return [[round(r["epoch"], 4), round(r[key], 2)] for r in rows]


def export_gap(ctx: Context, masked_model, variables, p_arch, p_params, n: int = 8) -> float:
    """Max |logit| difference of the masked and the exported model on a few test images, in
    float32 whatever the compute dtype (bfloat16 rounding would hide an export bug): export is
    exact, so this is float32 rounding (~1e-6). A model that drops tokens is compared with
    its dropping forward too (`models.tokens.dropping`), on the batch and one image at a
    time."""
    images = ctx.inputs(jnp.asarray(ctx.test.calibration_images(n)))
    masked_model = masked_model.clone(dtype=jnp.float32)
    masked = jax.jit(masked_model.apply)(variables, images)
    p_model = models.build(p_arch)  # float32
    gap = float(jnp.max(jnp.abs(masked - jax.jit(p_model.apply)({"params": p_params}, images))))
    if p_arch.token_points:
        dropped = tokens.compiled(p_model)
        gap = max(gap, float(jnp.max(jnp.abs(masked - dropped({"params": p_params}, images)[0]))))
        for i in range(len(images)):
            alone, _ = dropped({"params": p_params}, images[i : i + 1])
            gap = max(gap, float(jnp.max(jnp.abs(masked[i : i + 1] - alone))))
    return gap


def describe(ctx: Context, arch: Arch) -> bool:
    """Writes the config beside the run and says what is run on what; returns whether the dense
    model is untrained (and warns then)."""
    config = ctx.config
    if ctx.is_chief:
        checkpoint.write_json(paths.join(ctx.workdir, "config.json"), config.to_dict())
        n_params = count_params(
            jax.eval_shape(models.build(arch).init, jax.random.key(0), models.dummy_input(arch))[
                "params"
            ]
        )
        n = ctx.mesh.devices.size
        logging.info(
            "model %s: %d params, %.2f MMACs; data %s (%d train / %s%d test), %d device%s",
            arch.name,
            n_params,
            macs.model_macs(arch) / 1e6,
            config.data.name,
            len(ctx.train),
            "" if ctx.val is None else f"{len(ctx.val)} validation / ",
            len(ctx.test),
            n,
            "" if n == 1 else "s",
        )
    untrained = config.train.epochs == 0 and not config.model.checkpoint
    if untrained:
        logging.warning(
            "the dense model is untrained (train.epochs=0 and no model.checkpoint): it scores "
            "at chance, and pruned-vs-dense differences say nothing about the method"
        )
    return untrained


def method_of(ctx: Context, arch: Arch) -> Method:
    """The configured method charging the configured cost (a latency model is measured here);
    a target the model cannot reach fails before any training."""
    method = dataclasses.replace(
        methods.from_config(ctx.config), cost=tuning.budget_cost(ctx, arch)
    )
    method.check(arch)
    return method


def warn_fixup(ctx: Context, method: Method, ends: dict) -> None:
    if abs(ends["fixup"] or 0) > FIXUP_WARNING:
        logging.warning(
            "the search ended at %s ratio %.3f; the fix-up changed it by %.3f of the dense "
            "model's to reach %s (a longer search, or method settings that converge faster, "
            "leave the choice to the search)",
            method.cost.label,
            ends["search_end"],
            ends["fixup"],
            ctx.config.search.target,
        )


def evaluate_search(ctx: Context, arch: Arch, method: Method, variables, masked_model):
    """The search's result, masked and exported: (exported arch, its params, {masked_top1,
    exported_top1, val_exported_top1, export_diff})."""
    masked_top1 = ctx.evaluate(masked_model, variables)["top1"]
    p_arch, p_params = method.export(arch, variables)
    exported = ctx.build(p_arch)
    out = {
        "masked_top1": masked_top1,
        "exported_top1": ctx.evaluate(exported, {"params": p_params})["top1"],
        "val_exported_top1": ctx.val_top1(exported, {"params": p_params}),
        "export_diff": export_gap(ctx, masked_model, variables, p_arch, p_params),
    }
    logging.info(
        "search done: masked top1 %.2f, exported top1 %.2f, %s %.3f, "
        "max |masked - exported logit| %.2e",
        out["masked_top1"],
        out["exported_top1"],
        "channel MACs ratio" if p_arch.token_points else "MACs ratio",
        macs.model_macs(p_arch) / macs.model_macs(arch),
        out["export_diff"],
    )
    return p_arch, p_params, out
