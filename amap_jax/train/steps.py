"""Jit-compiled train / search / eval steps, shared by every stage.

One `TrainState` serves dense training, the indicator search and fine-tuning: the trainable tree
is `{'params': ...}` or `{'params': ..., 'indicators': ...}` and the optimizer is chosen per
collection with `optax.multi_transform`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from amap_jax.data import augment, mixing, preprocess
from amap_jax.models.tokens import REPORTS


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any  # {'params': ...[, 'indicators': ...]}
    opt_state: Any
    extra: Any  # non-trainable collections, e.g. {'similarity': ...}


@dataclasses.dataclass(frozen=True)
class Input:
    """How uint8 batches become model inputs (static: closed over by the step)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    crop_padding: int = 0
    flip: bool = False

    def __call__(self, images, rng=None):
        x = preprocess(images, self.mean, self.std, image_size=self.image_size)
        if rng is not None and (self.crop_padding or self.flip):
            x = augment(rng, x, crop_padding=self.crop_padding, flip=self.flip)
        return x


def schedule(lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Warmup then cosine decay; a stage of 0 or 1 steps still gets a valid schedule (optax
    wants at least one decay step)."""
    warmup = max(min(warmup_steps, max(total_steps - 1, 0)), 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(total_steps, warmup + 1), end_value=lr * 1e-2
    )


def decay_mask(params):
    """Weight decay on the kernels of dense and convolution layers only, as timm, DeiT and Swin
    choose by name: never on biases, norms, position embeddings, class / distillation tokens,
    relative position bias tables, FLatten's positional encoding and scale, or a method's
    multipliers (AMAP's reweight), whatever their rank."""
    return jax.tree.map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def adamw(lr: float, total_steps: int, warmup_steps: int, weight_decay: float, clip: float):
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.adamw(
            schedule(lr, total_steps, warmup_steps), weight_decay=weight_decay, mask=decay_mask
        ),
    )


def per_collection(optimizers: dict[str, optax.GradientTransformation]):
    """One optimizer per top-level collection of the trainable tree."""

    def labels(tree):
        return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in tree.items()}

    return optax.multi_transform(optimizers, labels)


def create_state(trainable, tx, extra=None) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=tx.init(trainable),
        extra=extra or {},
    )


def distillation(student_logits, teacher_logits, temperature: float):
    t = temperature
    p = jax.nn.softmax(teacher_logits / t)
    return (t * t) * optax.softmax_cross_entropy(student_logits / t, p).mean()


@dataclasses.dataclass(frozen=True)
class Objective:
    """Classification loss, optional distillation, optional regulariser of the trainable tree."""

    num_classes: int
    label_smoothing: float = 0.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    # (trainable, what the forward reported, mean over the batch, step) -> (loss, metrics)
    regularizer: Callable[[Any, Any, Callable], tuple[jax.Array, dict]] | None = None
    mixup_alpha: float = 0.0  # mixup / cutmix of the DeiT recipe, on device (data.mixing)
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5

    def targets(self, rng, x, labels):
        """(inputs, soft targets): smoothed one-hot labels, mixed with the images if asked."""
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            return x, mixing.smooth_targets(labels, self.num_classes, self.label_smoothing)
        return mixing.mixup_cutmix(
            rng,
            x,
            labels,
            self.num_classes,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            prob=self.mix_prob,
            switch_prob=self.mix_switch_prob,
            smoothing=self.label_smoothing,
        )


def make_train_step(
    model,
    tx,
    inputs: Input,
    objective: Objective,
    seed: int,
    teacher=None,
    axis_name: str | None = None,
):
    """(state, batch[, teacher_variables]) -> (state, metrics); jit it with donate_argnums=0,
    or, with `axis_name`, pmap it over that axis (`parallel.Placement` does either).

    Under pmap each device holds a slice of the batch; augmentation and mixup partners are
    drawn over the whole batch (gathered) and each device keeps its slice, so that the random
    draws, and the numbers, do not depend on how the batch is split. Gradients and metrics
    are averaged over the devices.

    `teacher` is a module; its variables are passed per call so they stay device arrays. A
    distilled DeiT learns as in DeiT: with a teacher, the class head from the labels and the
    distillation head from the teacher; without one, both heads' mean from the labels.
    """
    two_heads = teacher is not None and objective.kd_weight > 0
    two_heads = two_heads and getattr(model.arch, "distilled", False)
    # Under mixup / cutmix the label of a mixed image is a mixture: no training accuracy.
    mixed = objective.mixup_alpha > 0 or objective.cutmix_alpha > 0
    if axis_name is None:
        mean = jnp.mean
    else:  # equal slices per device: the mean of the devices' means is the batch's

        def mean(x):
            return jax.lax.pmean(jnp.mean(x), axis_name)

    def step(state: TrainState, batch, teacher_variables=None):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        aug_rng, mix_rng = jax.random.split(rng)
        if axis_name is None:
            x, targets = objective.targets(mix_rng, inputs(batch["image"], aug_rng), batch["label"])
        else:
            local = batch["label"].shape[0]
            whole = jax.lax.all_gather(batch, axis_name, tiled=True)
            x, targets = objective.targets(mix_rng, inputs(whole["image"], aug_rng), whole["label"])
            start = jax.lax.axis_index(axis_name) * local
            x, targets = (jax.lax.dynamic_slice_in_dim(t, start, local) for t in (x, targets))

        def loss_fn(trainable):
            # What the forward reports (kept tokens) goes to the regulariser.
            v = {**trainable, **state.extra}
            if two_heads:
                (logits, dist), aux = model.apply(v, x, heads=True, mutable=[REPORTS])
            else:
                logits, aux = model.apply(v, x, mutable=[REPORTS])
                dist = logits
            ce = optax.softmax_cross_entropy(logits, targets).mean()
            loss, metrics = ce, {"ce": ce}
            if two_heads:
                logits = (logits + dist) / 2  # what inference gives, for the accuracy
            if teacher is not None and objective.kd_weight > 0:
                t_logits = jax.lax.stop_gradient(teacher.apply(teacher_variables, x))
                kd = distillation(dist, t_logits, objective.kd_temperature)
                loss = (1 - objective.kd_weight) * ce + objective.kd_weight * kd
                metrics["kd"] = kd
            if objective.regularizer is not None:
                reports = aux.get(REPORTS, {})
                reg, reg_metrics = objective.regularizer(trainable, reports, mean, state.step)
                loss = loss + reg
                metrics.update(reg_metrics)
            metrics["loss"] = loss
            if not mixed:
                metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
            return loss, metrics

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.trainable)
        if axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)  # the loop stops on a non-finite one
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new, metrics

    return step


def make_eval_step(model, inputs: Input):
    """(variables, batch) -> summed correct / loss / count over the real (mask=1) examples."""

    def step(variables, batch):
        logits = model.apply(variables, inputs(batch["image"]))
        mask = batch.get("mask", jnp.ones(logits.shape[:1]))
        correct = (jnp.argmax(logits, -1) == batch["label"]) * mask
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]) * mask
        return {"correct": correct.sum(), "loss": nll.sum(), "count": mask.sum()}

    return step
