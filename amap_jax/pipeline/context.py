"""What every stage of a run shares: the config, the data, the mesh, the dense architecture,
and how a stage is compiled, trained and evaluated.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax import config as config_lib
from amap_jax import methods, models
from amap_jax import workdir as workdir_lib
from amap_jax.data.splits import open_split
from amap_jax.io import paths, pretrained
from amap_jax.methods import Method
from amap_jax.methods.base import CalibrationBatch
from amap_jax.models.arch import Arch, swin_arch, vit_arch
from amap_jax.train import parallel, steps
from amap_jax.train.evaluate import evaluate
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
        lr = steps.schedule(stage.lr, total, warmup_steps(stage, per_epoch))
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
        return models.build(arch, sites=method, dtype=models.compute_dtype(self.config.model.dtype))

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


def warmup_steps(stage, per_epoch: int) -> int:
    return int(stage.warmup_epochs * per_epoch)


def optimizer(stage, total: int, per_epoch: int, extra: dict | None = None):
    warmup = warmup_steps(stage, per_epoch)
    tx = {"params": steps.adamw(stage.lr, total, warmup, stage.weight_decay, stage.grad_clip)}
    return steps.per_collection({**tx, **(extra or {})})


def count_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


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
