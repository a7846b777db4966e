"""A run: train (dense) -> search -> export -> finetune -> eval, in one work directory.

Every stage checkpoints in its own sub-directory and resumes where it stopped; a stage that
finished is not run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax import config as config_lib
from amap_jax import latency, methods, models, xla_cpu
from amap_jax import workdir as workdir_lib
from amap_jax.data.splits import open_split
from amap_jax.io import artifact, paths, pretrained, pruned
from amap_jax.logs import log as logging
from amap_jax.methods import Method
from amap_jax.methods.base import CalibrationBatch
from amap_jax.models import tokens
from amap_jax.models.arch import Arch, swin_arch, vit_arch
from amap_jax.pruning import cost as cost_lib
from amap_jax.pruning import macs, padding
from amap_jax.train import checkpoint, parallel, scalars, steps, stop
from amap_jax.train import evaluate as evaluate_lib
from amap_jax.train.evaluate import evaluate, throughput
from amap_jax.train.loop import fit


@dataclasses.dataclass
class Context:
    config: object
    workdir: str
    mesh: object
    train: object  # data.splits.ArraySplit or RecipeSplit
    test: object
    inputs: steps.Input
    process_index: int = 0
    process_count: int = 1
    placement: parallel.Placement | None = None  # jit (default) or pmap
    val: object = None  # the validation split (data.val_split), where there is one

    def compile(self, model, tx, objective, seed: int, teacher=None):
        """The train step of a stage, jitted or pmapped as configured."""
        p = self.placement or parallel.Placement(self.mesh)
        return p.compile(
            steps.make_train_step(model, tx, self.inputs, objective, seed, teacher, p.axis)
        )

    @property
    def is_chief(self) -> bool:
        return self.process_index == 0

    def stage_dir(self, name: str) -> str:
        return paths.join(self.workdir, name)

    def steps(self, stage) -> tuple[int, int]:
        """(total steps, steps per epoch) of a stage."""
        per_epoch = max(len(self.train) // stage.batch_size, 1)
        return int(math.ceil(stage.epochs * per_epoch)), per_epoch

    def batches(self, batch_size: int, seed: int):
        return lambda start: self.train.train_batches(
            batch_size,
            seed=seed,
            start_step=start,
            process_index=self.process_index,
            process_count=self.process_count,
        )

    def fit(self, name: str, directory: str, stage, state, step_fn, seed: int, **kw):
        """The stage loop with what every stage shares filled in; the work directory remembers
        the config the stage is made with."""
        total, per_epoch = self.steps(stage)
        if self.is_chief:
            workdir_lib.record(self.workdir, self.config, directory)
        lr = steps.schedule(stage.lr, total, _warmup(stage, per_epoch))
        return fit(
            name=name,
            directory=self.stage_dir(directory),
            state=state,
            step_fn=step_fn,
            batches=self.batches(stage.batch_size, seed),
            num_steps=total,
            steps_per_epoch=per_epoch,
            mesh=self.mesh,
            checkpoint_every=self.config.checkpoint_every,
            is_chief=self.is_chief,
            placement=self.placement,
            scalars_dir=self.workdir,
            scalars_every=self.config.scalars_every,
            lr_fn=lr,
            **kw,
        )

    def test_top1(self, model):
        """`on_epoch` callback: validation and test accuracy of the state's weights."""

        def on_epoch(_, state):
            out = {"test_top1": self.evaluate(model, state.trainable)["top1"]}
            if self.val is not None:
                out["val_top1"] = self.evaluate(model, state.trainable, "val")["top1"]
            return out

        return on_epoch

    def evaluate(self, model, variables, split: str = "test") -> dict:
        """Top-1 and loss on the test split (reported numbers) or the validation split
        ("val": what defaults and tuning read)."""
        data = self.val if split == "val" else self.test
        if data is None:
            raise ValueError("no validation split: set data.val_split")
        batches = data.eval_batches(
            self.config.eval.batch_size, self.process_index, self.process_count
        )
        return evaluate(model, variables, batches, self.inputs, self.mesh)

    def val_top1(self, model, variables) -> float | None:
        return (
            None if self.val is None else round(self.evaluate(model, variables, "val")["top1"], 2)
        )

    def build(self, arch, method: Method | None = None):
        """The module for `arch` in the configured compute dtype, with `method` at its sites."""
        dtype = jnp.bfloat16 if self.config.model.dtype == "bfloat16" else jnp.float32
        return models.build(arch, sites=method, dtype=dtype)

    def calibration(self, n: int) -> CalibrationBatch:
        """n training examples drawn with the run's seed (the same ones on every call),
        preprocessed as the model takes them."""
        batch = self.train.calibration_batch(n, seed=self.config.seed)
        return CalibrationBatch(
            self.inputs(jnp.asarray(batch["image"])), jnp.asarray(batch["label"])
        )

    def objective(self, arch, stage, **kw) -> steps.Objective:
        d = self.config.data
        return steps.Objective(
            arch.num_classes,
            stage.label_smoothing,
            mixup_alpha=d.mixup_alpha,
            cutmix_alpha=d.cutmix_alpha,
            mix_prob=d.mix_prob,
            mix_switch_prob=d.mix_switch_prob,
            **kw,
        )


def build_arch(config, info) -> Arch:
    """The dense architecture: a published one (normalised as it was trained) or one of the
    families at the data's size and statistics."""
    arch = _family_arch(config, info)
    if hasattr(arch, "token_head_weight"):
        arch = arch.replace(token_head_weight=config.model.token_head_weight)
    return arch


def _family_arch(config, info) -> Arch:
    h, _, c = info.image_shape
    m = config.model
    size = config.data.image_size or h or None
    if m.name:
        if c != 3:
            raise ValueError(f"{m.name} takes RGB images; {info.name} has {c} channels")
        return pretrained.named_arch(m.name, image_size=size, num_classes=info.num_classes)
    kw = dict(
        num_classes=info.num_classes,
        in_chans=c,
        image_size=size,
        mean=tuple(info.mean),
        std=tuple(info.std),
        gelu_approximate=m.gelu_approximate,
    )
    if m.family == "swin":
        return swin_arch(m.variant, pattern=m.pattern or "SSSS", **kw)
    return vit_arch(m.variant, pattern=m.pattern or None, patch_size=m.patch_size or None, **kw)


def _warmup(stage, per_epoch: int) -> int:
    return int(stage.warmup_epochs * per_epoch)


def _optimizer(stage, total: int, per_epoch: int, extra: dict | None = None):
    warmup = _warmup(stage, per_epoch)
    tx = {"params": steps.adamw(stage.lr, total, warmup, stage.weight_decay, stage.grad_clip)}
    return steps.per_collection({**tx, **(extra or {})})


def _check_export_dir(ctx: Context, export_dir: str) -> None:
    """A finished export that this work directory did not write is never overwritten."""
    ours = workdir_lib.export_location(ctx.workdir) == export_dir
    if pruned.is_finished(export_dir) and not ours:
        raise FileExistsError(
            f"export directory {export_dir} already holds a finished export; "
            "pass another --config.export_dir or --workdir"
        )


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
    tx = _optimizer(cfg, total, per_epoch)
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
    tx = _optimizer(cfg, total, per_epoch, method.optimizers(total, arch))
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
    tx = _optimizer(cfg, total, per_epoch)
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


def _export_gap(ctx: Context, masked_model, variables, p_arch, p_params, n: int = 8) -> float:
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
    if getattr(p_arch, "token_points", ()):
        dropped = tokens.compiled(p_model)
        gap = max(gap, float(jnp.max(jnp.abs(masked - dropped({"params": p_params}, images)[0]))))
        for i in range(len(images)):
            alone, _ = dropped({"params": p_params}, images[i : i + 1])
            gap = max(gap, float(jnp.max(jnp.abs(masked[i : i + 1] - alone))))
    return gap


def _count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def _pad(ctx: Context, arch: Arch, params):
    """The fine-tuned export padded to `export_pad`; 0: whatever runs fastest here as a whole
    model, of unpadded, padded per layer shape and padded to one multiple (`padding.measured`),
    chosen by process 0 for all."""
    multiple = ctx.config.export_pad
    if multiple == 0:
        batch = ctx.config.eval.bench_batch
        choice, report = padding.measured(arch, params, batch)
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


def _kernels(ctx: Context, arch: Arch, params) -> str:
    """The CPU kernel set `arch` is compiled with (`cpu_kernels`); "measure": the fastest here
    as a whole model (`padding.fastest_kernels`), chosen by process 0 for all."""
    name = ctx.config.cpu_kernels
    if name != "measure":
        return name
    name, gains = padding.fastest_kernels(arch, params, ctx.config.eval.bench_batch)
    logging.info(
        "CPU kernels of %s: %s; chose %s",
        arch.name,
        ", ".join(f"{k}: {v:.2f}x" for k, v in gains.items()) or "one set usable",
        name,
    )
    names = list(xla_cpu.SETS)
    return names[int(parallel.broadcast(np.asarray(names.index(name))))]


def _bench_images(ctx: Context):
    """Test images a token export is timed on: what is kept depends on the image."""
    n = max(ctx.config.eval.bench_batch, 64)
    return ctx.inputs(jnp.asarray(ctx.test.calibration_images(n)))


def _groups(ctx: Context, arch: Arch, params) -> Arch:
    """`arch` with the parts its dropping forward runs a batch in: 0 (`asvit.groups`) becomes
    1 or `tokens.GROUPS`, whichever runs faster here at the bench batch, chosen by process 0
    for all."""
    if getattr(arch, "token_groups", 1) != 0:
        return arch
    bench, model = ctx.config.eval, ctx.build(arch)
    images = _bench_images(ctx)
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


SPEED_ROUNDS = 5
# Same-round speedups that spread over more than this share of their median: the machine was
# busy while they were timed, and the summary says so.
BUSY_SPREAD = 0.2


def _paired_speeds(ctx: Context, arch: Arch, params, p_arch: Arch, p_params, p_kernels: str):
    """Dense and pruned images/s per round, timed interleaved at the bench batch
    (`evaluate.paired_throughput`), and the dense model's kernel set."""
    kernels = _kernels(ctx, arch, params)
    bench = ctx.config.eval
    runs = {
        "dense": (ctx.build(arch), {"params": params}, arch, kernels),
        "pruned": (ctx.build(p_arch), {"params": p_params}, p_arch, p_kernels),
    }
    speeds = evaluate_lib.paired_throughput(
        runs, bench.bench_batch, seconds=bench.bench_seconds, rounds=SPEED_ROUNDS
    )
    return speeds, kernels


def speedup_of(speeds: dict[str, list[float]]) -> dict:
    """The pruned/dense ratio of every round: its median, its range, and whether the rounds
    spread so far that the machine was busy."""
    ratios = [p / d for p, d in zip(speeds["pruned"], speeds["dense"], strict=True)]
    median = float(np.median(ratios))
    low, high = min(ratios), max(ratios)
    return {
        "speedup": round(median, 3),
        "speedup_range": [round(low, 3), round(high, 3)],
        "speed_rounds": len(ratios),
        "speed_busy": bool((high - low) > BUSY_SPREAD * median),
    }


def _report(
    ctx: Context,
    arch: Arch,
    params,
    top1: float,
    unpadded: Arch | None = None,
    kernels: str | None = None,
    images_per_s: float | None = None,
) -> dict:
    """`macs` are the pruned model's; `padded_macs` what its padded export computes; speed
    `images_per_s` (None: timed here alone) with CPU kernel set `kernels` (None: as
    `cpu_kernels` says)."""
    model = ctx.build(arch)
    bench = ctx.config.eval
    if getattr(arch, "token_points", ()):
        return _token_report(ctx, model, {"params": params}, top1, unpadded or arch)
    padded = {} if unpadded in (None, arch) else {"padded_macs": int(macs.model_macs(arch))}
    kernels = kernels or _kernels(ctx, arch, params)
    return {
        **padded,
        "params": _count(params),
        "macs": int(macs.model_macs(unpadded or arch)),
        "top1": round(top1, 2),
        "images_per_s": round(
            images_per_s
            or throughput(
                model,
                {"params": params},
                arch,
                bench.bench_batch,
                seconds=bench.bench_seconds,
                kernels=kernels,
            ),
            1,
        ),
        "cpu_kernels": kernels,
    }


def _token_report(ctx: Context, model, variables, top1: float, count_arch: Arch) -> dict:
    """A model that drops tokens: MACs are the mean over the test images, speed is measured on
    test images (what is kept depends on the image) at the bench batch, with the dropping
    forward of the export (one compiled program over its `token_buckets`, as forward.jax runs
    it); batch 1 is timed beside the dense model (`evaluate.batch1_speeds`)."""
    arch, bench = model.arch, ctx.config.eval
    batches = ctx.test.eval_batches(bench.batch_size, ctx.process_index, ctx.process_count)
    kept = evaluate_lib.kept_tokens(model, variables, batches, ctx.inputs, ctx.mesh)
    counts = macs.token_counts(
        arch, arch.token_points, [kept[:, k] + arch.num_prefix for k in range(kept.shape[1])]
    )
    images = _bench_images(ctx)
    speed = evaluate_lib.token_throughput(
        model, variables, images, bench.bench_batch, seconds=bench.bench_seconds
    )
    return {
        "params": _count(variables["params"]),
        "macs": int(np.mean(macs.model_macs(count_arch, None, counts))),
        "top1": round(top1, 2),
        "images_per_s": round(speed, 1),
        "kept_tokens_mean": [round(float(x), 2) for x in kept.mean(0)],
        "kept_tokens_of": arch.grid**2,
        "token_groups": tokens.groups_of(arch),
    }


def make_context(config, workdir: str) -> tuple[Context, Arch]:
    """Checks the config, opens the data and builds the dense architecture; writes nothing."""
    config_lib.validate(config)
    mesh = parallel.make_mesh(config.num_devices or None)
    d = config.data
    train, test = open_split(d, d.train_split), open_split(d, d.test_split)
    val = open_split(d, d.val_split) if d.val_split else None
    named = [(train, d.train_split), (test, d.test_split)] + ([(val, d.val_split)] if val else [])
    for split, name in named:
        if len(split) == 0:
            raise ValueError(f"data: split {name!r} of {d.name} is empty")
    for stage in ("train", "search", "finetune", "eval"):
        parallel.check_batch_size(config[stage].batch_size, mesh, f"{stage}.batch_size")
        if stage != "eval" and config[stage].epochs > 0 and config[stage].batch_size > len(train):
            raise ValueError(
                f"{stage}.batch_size {config[stage].batch_size} is larger than the "
                f"{len(train)} training images of {d.train_split!r}: not one full batch"
            )
    arch = build_arch(config, train.info)
    methods.from_config(config).check(arch)  # a target the method cannot reach fails now
    inputs = steps.Input(arch.mean, arch.std, arch.image_size, d.crop_padding, d.flip)
    ctx = Context(
        config,
        paths.absolute(workdir),
        mesh,
        train,
        test,
        inputs,
        jax.process_index(),
        jax.process_count(),
        parallel.Placement(mesh, config.parallel),
        val,
    )
    return ctx, arch


def run(config, workdir: str) -> dict:
    """Runs (or resumes) every stage and returns the summary written to WORKDIR/summary.json.

    A stop request (SIGTERM, Ctrl-C; `train.stop`) ends the run at the next safe point, in any
    phase, with what was finished kept."""
    stop.reset()
    if not str(workdir or "").strip():  # e.g. --workdir "$UNSET": never the current directory
        raise ValueError("workdir is empty (an unset shell variable?): name a work directory")
    with stop.phase("setup"):
        ctx, arch = make_context(config, workdir)
        workdir = ctx.workdir
        export_dir = paths.absolute(config.export_dir or paths.join(workdir, "export"))
        for path in (workdir, export_dir):
            paths.check_scheme(path)
        workdir_lib.check(workdir, config)
        if config.export_artifact:
            artifact.check_available()
        _check_export_dir(ctx, export_dir)
        # Every check passed: only now is anything written.
        paths.makedirs(workdir)
    with _lock(ctx, export_dir):
        _check_export_dir(ctx, export_dir)  # again: another run may have finished it meanwhile
        return _run(ctx, arch, export_dir)


@contextlib.contextmanager
def _lock(ctx: Context, export_dir: str):
    """The work directory, and an export directory outside it, for this run alone (the chief
    holds the locks for every process): two runs with one export_dir would each take the
    other's export for their own."""
    with contextlib.ExitStack() as held:
        refused = ""
        if ctx.is_chief:
            try:
                held.enter_context(workdir_lib.lock(ctx.workdir))
                if paths.relpath(export_dir, ctx.workdir) == export_dir:  # not inside it
                    held.enter_context(
                        workdir_lib.lock(export_dir, workdir_lib.export_lock_path(export_dir))
                    )
            except workdir_lib.WorkdirLockedError as e:
                refused = str(e)
        if parallel.any_process(bool(refused)):
            raise workdir_lib.WorkdirLockedError(
                refused or f"{ctx.workdir} is in use by another run (see process 0)"
            )
        yield


def _run(ctx: Context, arch: Arch, export_dir: str) -> dict:
    config, workdir = ctx.config, ctx.workdir
    if ctx.is_chief:
        checkpoint.write_json(paths.join(workdir, "config.json"), config.to_dict())
        n_params = _count(
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
    with stop.phase("latency model"):
        method = dataclasses.replace(methods.from_config(config), cost=budget_cost(ctx, arch))
        method.check(arch)  # a latency target the model cannot reach fails before training
    untrained = config.train.epochs == 0 and not config.model.checkpoint
    if untrained:
        logging.warning(
            "the dense model is untrained (train.epochs=0 and no model.checkpoint): it scores "
            "at chance, and pruned-vs-dense differences say nothing about the method"
        )

    with stop.phase("train"):
        dense_params = train_dense(ctx, arch)
    with stop.phase("dense evaluation"):
        dense_eval = ctx.evaluate(ctx.build(arch), {"params": dense_params})

    with stop.phase("search"):
        variables, masked_model, search_ends = search(ctx, arch, dense_params, method)
    if abs(search_ends["fixup"] or 0) > FIXUP_WARNING:
        logging.warning(
            "the search ended at %s ratio %.3f; the fix-up changed it by %.3f of the dense "
            "model's to reach %s (a longer search, or method settings that converge faster, "
            "leave the choice to the search)",
            method.cost.label,
            search_ends["search_end"],
            search_ends["fixup"],
            config.search.target,
        )
    with stop.phase("search evaluation"):
        masked_eval = ctx.evaluate(masked_model, variables)
        p_arch, p_params = method.export(arch, variables)
        exported_eval = ctx.evaluate(ctx.build(p_arch), {"params": p_params})
        val_after_search = ctx.val_top1(ctx.build(p_arch), {"params": p_params})
        export_diff = _export_gap(ctx, masked_model, variables, p_arch, p_params)
    logging.info(
        "search done: masked top1 %.2f, exported top1 %.2f, %s %.3f, "
        "max |masked - exported logit| %.2e",
        masked_eval["top1"],
        exported_eval["top1"],
        "channel MACs ratio" if getattr(p_arch, "token_points", ()) else "MACs ratio",
        macs.model_macs(p_arch) / macs.model_macs(arch),
        export_diff,
    )

    with stop.phase("finetune"):
        p_params = finetune(ctx, p_arch, p_params, arch, dense_params)
        p_params = method.recalibrate(arch, p_arch, p_params, ctx.calibration)
    unpadded = p_arch
    with stop.phase("export"):
        parallel.barrier("before export")  # every process sees the same is_finished
        if not pruned.is_finished(export_dir):  # every process takes part in the save
            if ctx.is_chief:
                workdir_lib.record(workdir, config, "export")
                workdir_lib.mark_export(workdir, export_dir)  # ours before it is finished
            padded_arch, padded_params, multiple = _pad(ctx, p_arch, p_params)
            kernels = _kernels(ctx, padded_arch, padded_params)
            padded_arch = _groups(ctx, padded_arch, padded_params)
            stop.check()
            pruned.save_pruned(
                export_dir,
                padded_arch,
                padded_params,
                class_names=ctx.train.info.class_names,
                method=config.method,
                dense_macs=int(macs.model_macs(arch)),
                export_pad=multiple,
                cpu_kernels=kernels,
                cpu_compiler_options=xla_cpu.SETS[kernels],  # for loaders without amap_jax
            )
        if config.export_artifact and ctx.is_chief and not pruned.has_artifact(export_dir):
            pruned.add_artifact(export_dir)  # deployable with jax alone
        parallel.barrier("artifact written")
        # What was exported, padding included (a finished export is read back, not redone).
        model, loaded = pruned.load_pruned(export_dir)
        p_arch, multiple = model.arch, pruned.read_meta(export_dir).get("export_pad", 1)
    with stop.phase("final evaluation"):
        pruned_eval = ctx.evaluate(model, loaded)
        p_kernels = pruned.kernels(export_dir)
        speeds, d_kernels = None, None  # a token export times its own way
        if not getattr(p_arch, "token_points", ()):
            speeds, d_kernels = _paired_speeds(
                ctx, arch, dense_params, p_arch, loaded["params"], p_kernels
            )
        summary = {
            "method": config.method,
            "method_settings": {k: config[k].to_dict() for k in method.sections()},
            "target_macs_ratio": config.search.target,
            "dense": _report(
                ctx,
                arch,
                dense_params,
                dense_eval["top1"],
                kernels=d_kernels,
                images_per_s=speeds and float(np.median(speeds["dense"])),
            ),
            "pruned": _report(
                ctx,
                p_arch,
                loaded["params"],
                pruned_eval["top1"],
                unpadded,
                p_kernels,
                images_per_s=speeds and float(np.median(speeds["pruned"])),
            ),
            "pruned_before_finetune_top1": round(exported_eval["top1"], 2),
            "finetune_top1_by_epoch": finetune_curve(workdir),
            "masked_top1": round(masked_eval["top1"], 2),
            "export_max_logit_diff": export_diff,
            "arch": {
                "dense": arch.name,
                # per block: attention kind, heads, q/k and v per head, MLP, q/k/v and fc1 inputs
                "pruned_blocks": [
                    [b.attn, b.heads, b.qk_dim, b.v_dim, b.mlp_dim, *macs.widths(b, g.dim)[3:]]
                    for b, g in zip(unpadded.blocks, unpadded.geometry(), strict=True)
                ],
            },
            "export_dir": export_dir,
            "export_pad": multiple,
            "reference": config.reference,
            # Every "top1" above is the test split's; "val" holds the validation split's.
            "splits": {
                "train": config.data.train_split,
                "val": config.data.val_split or None,
                "test": config.data.test_split,
            },
            **({"dense_untrained": True} if untrained else {}),
        }
        if ctx.val is not None:
            summary["val"] = {
                "dense_top1": ctx.val_top1(ctx.build(arch), {"params": dense_params}),
                "pruned_before_finetune_top1": val_after_search,
                "finetune_top1_by_epoch": finetune_curve(workdir, key="val_top1"),
                "pruned_top1": ctx.val_top1(model, loaded),
            }
        s = summary
        s["macs_ratio"] = round(s["pruned"]["macs"] / s["dense"]["macs"], 4)
        if speeds is None:
            s["speedup"] = round(s["pruned"]["images_per_s"] / s["dense"]["images_per_s"], 3)
        else:
            s.update(speedup_of(speeds))
        s["ideal_speedup"] = round(s["dense"]["macs"] / s["pruned"]["macs"], 3)
        if getattr(p_arch, "token_points", ()):  # token pruning: batch 1 is where it pays most
            images = ctx.inputs(jnp.asarray(ctx.test.calibration_images(64)))
            dense_b1, pruned_b1 = evaluate_lib.batch1_speeds(
                ctx.build(arch),
                {"params": dense_params},
                model,
                loaded,
                images,
                seconds=config.eval.bench_seconds,
            )
            s["dense"]["images_per_s_batch1"] = round(dense_b1, 1)
            s["pruned"]["images_per_s_batch1"] = round(pruned_b1, 1)
            s["speedup_batch1"] = round(pruned_b1 / dense_b1, 3)
        timed = None
        if config.search.budget_kind == "latency":
            timed = {
                "predicted": round(method.cost.of(arch, p_arch), 4),
                **measured_latency(ctx, arch, dense_params, p_arch, loaded["params"], p_kernels),
            }
        s["budget"] = {
            **budget(
                config.search,
                s["pruned"].get("padded_macs", s["pruned"]["macs"]),
                s["dense"]["macs"],
                timed,
            ),
            **{k: v for k, v in search_ends.items() if k != "report"},
        }
        if "report" in search_ends:
            s["search_report"] = search_ends["report"]
        if not s["budget"]["met"]:
            logging.warning("%s", budget_message(s))
    if ctx.is_chief:
        checkpoint.write_json(paths.join(workdir, "summary.json"), summary)
    return summary


def finetune_curve(
    workdir: str, stage: str = "finetune", key: str = "test_top1"
) -> list[list[float]]:
    """[[epoch, top-1], ...] of a stage (`key`: test_top1 or val_top1), as its scalars recorded
    them (every epoch)."""
    rows = [r for r in scalars.read(workdir) if r["stage"] == stage and key in r]
    return [[round(r["epoch"], 4), round(r[key], 2)] for r in rows]


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
        return cost_lib.Latency.from_json(json.loads(paths.read_text(path)))
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


def measured_latency(ctx: Context, arch: Arch, params, p_arch: Arch, p_params, p_kernels):
    """Pruned / dense seconds per batch of `search.latency_batch`, timed interleaved: the
    median over rounds, the range, whether the machine was busy."""
    kernels = _kernels(ctx, arch, params)
    runs = {
        "dense": (ctx.build(arch), {"params": params}, arch, kernels),
        "pruned": (ctx.build(p_arch), {"params": p_params}, p_arch, p_kernels),
    }
    speeds = evaluate_lib.paired_throughput(
        runs,
        ctx.config.search.latency_batch,
        seconds=ctx.config.eval.bench_seconds,
        rounds=SPEED_ROUNDS,
    )
    ratios = [d / p for p, d in zip(speeds["pruned"], speeds["dense"], strict=True)]
    median = float(np.median(ratios))
    return {
        "batch": ctx.config.search.latency_batch,
        "measured": round(median, 4),
        "measured_range": [round(min(ratios), 4), round(max(ratios), 4)],
        "busy": bool(max(ratios) - min(ratios) > BUSY_SPREAD * median),
    }


FIXUP_WARNING = 0.02  # a fix-up that removes more than this share of the dense MACs is warned


def budget(search_cfg, achieved_macs: float, dense_macs: float, timed: dict | None = None) -> dict:
    """The budget as achieved by the export (padding included; for tokens the mean over the
    test set) against the one asked for: its MACs ratio, or for a latency target the ratio
    timed against the dense model (`timed`, `measured_latency`; `predicted`: the latency
    model's)."""
    if search_cfg.budget_kind == "latency":
        achieved, tol = timed["measured"], search_cfg.latency_tolerance
    else:
        achieved, tol = achieved_macs / dense_macs, search_cfg.target_tolerance
    return {
        "kind": search_cfg.budget_kind,
        "target": search_cfg.target,
        "achieved": round(achieved, 4),
        "tolerance": tol,
        "met": bool(abs(achieved - search_cfg.target) <= tol),
        **(timed or {}),
    }


def budget_message(s: dict) -> str:
    b = s["budget"]
    kind, key = (
        ("latency", "latency_tolerance")
        if b.get("kind") == "latency"
        else ("MACs", "target_tolerance")
    )
    return (
        f"the export's {kind} ratio {b['achieved']:.3f} misses its target {b['target']} by more "
        f"than search.{key}={b['tolerance']}; the export is kept in {s['export_dir']}"
    )


def format_summary(s: dict) -> str:
    rows = [("", "params", "MACs", "top-1 %", "images/s")]
    for k in ("dense", "pruned"):
        r = s[k]
        rows.append(
            (
                k,
                f"{r['params']:,}",
                f"{r['macs'] / 1e6:.2f}M",
                f"{r['top1']:.2f}",
                f"{r['images_per_s']:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    speed = f"speedup {s['speedup']:.2f}x"
    if "speedup_range" in s:
        low, high = s["speedup_range"]
        speed += f" ({low:.2f}-{high:.2f} over {s['speed_rounds']} interleaved rounds)"
    lines.append(
        f"MACs ratio {s['macs_ratio']:.3f} (target {s['target_macs_ratio']}), "
        f"top-1 change {s['pruned']['top1'] - s['dense']['top1']:+.2f}, "
        f"{speed} (ideal {s['ideal_speedup']:.2f}x), method {s['method']}"
    )
    b = s.get("budget", {})
    if b.get("kind") == "latency":
        low, high = b["measured_range"]
        lines.append(
            f"latency ratio at batch {b['batch']}: {b['measured']:.3f} timed "
            f"({low:.3f}-{high:.3f}), {b['predicted']:.3f} predicted (target {b['target']})"
        )
    if s.get("speed_busy"):
        lines.append(
            "the machine was busy while the speeds were timed (the rounds spread widely): "
            "read the speedup as rough, or time it on a quiet machine"
        )
    pad = s.get("export_pad", 1)
    if pad != 1 and "padded_macs" in s["pruned"]:
        how = (
            f"to multiples of {pad}"
            if isinstance(pad, int)
            else "per block (attention, MLP): " + " ".join(f"{a}/{m}" for a, m in pad)
        )
        lines.append(f"export padded {how}: {s['pruned']['padded_macs'] / 1e6:.2f}M MACs computed")
    kernels = [s[k].get("cpu_kernels", "default") for k in ("dense", "pruned")]
    if kernels != ["default", "default"]:
        lines.append(f"CPU kernels: dense {kernels[0]}, pruned {kernels[1]}")
    if s.get("reference"):
        lines.append(f"published: {s['reference']}")
    return "\n".join(lines)
