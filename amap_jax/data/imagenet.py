"""ImageNet-1K input with the DeiT/Swin training recipe, as tf.data pipelines yielding uint8.

The host does the per-image work: decode (only the crop window, for JPEGs), random resized crop,
flip, RandAugment and random erasing. Normalisation stays on device in `train.steps.Input`, and
mixup/cutmix, which mix whole batches, run on device too (`data.mixing`).

Random erasing happens here, on uint8, before normalisation. The reference fills the erased box
of the normalised image with N(0, 1) noise; noise drawn as N(255 mean, 255 std) per channel and
saturated to uint8 normalises to the same thing up to clipping and rounding. So every per-image
augmentation stays on the host, and the device step needs no change.

Determinism: each epoch is its own tf.data pipeline. File order, shuffle buffer and the
stateless per-image augmentation seeds all derive from (seed, epoch, process_index) and the
image's position in the epoch, so batch `s` does not depend on where the run started. Resuming
at step `s` skips `s mod steps_per_epoch` batches of records before anything is decoded.

Where the records come from (a prepared tfds split or a folder, sharded per process):
`data.imagenet_records`.

TensorFlow is imported inside functions only (`import_tf`): the rest of amap_jax runs without it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from amap_jax.data import randaugment

# Reading the records, importable from here as before (splits, tests).
from amap_jax.data.imagenet_records import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSplit,
    open_imagenet,
)
from amap_jax.data.sources import DatasetInfo
from amap_jax.data.tf import cardinality, import_tf, plain

if TYPE_CHECKING:
    import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The host side of the DeiT/Swin ImageNet recipe; 0 or False switches a step off.

    Mixup/cutmix and label smoothing mix whole batches on device (`train.steps.Objective`).
    """

    image_size: int = 224
    random_crop: bool = True  # False: train images get the eval resize and centre crop.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: float = 9.0
    randaugment_std: float = 0.5
    erasing_prob: float = 0.25
    eval_crop_fraction: float = 0.875  # Eval resizes the shorter side to image_size / this.


def train_batches(
    data: ImageSplit,
    global_batch_size: int,
    recipe: Recipe = Recipe(),
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_buffer: int = 10_000,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless augmented batches of this process: image uint8 [local, S, S, 3], label int32."""
    tf = import_tf()
    local = _local_batch_size(global_batch_size, process_count)
    shard = data.records(process_index, process_count, drop_remainder=True)
    steps_per_epoch = cardinality(shard) // local
    if steps_per_epoch == 0:
        raise ValueError(f"{data.info.name}: local batch {local} exceeds this process's shard")
    first_epoch, skip = divmod(start_step, steps_per_epoch)

    # Traced once; each epoch's pipeline calls the same graph (tracing RandAugment takes ~1 s).
    @tf.function(autograph=False)
    def example(record: dict[str, tf.Tensor], key: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = data.load(record)
        return {"image": _train_image(ex["image"], key, recipe, data.info), "label": ex["label"]}

    def epoch_batches(epoch: int, skip_batches: int) -> tf.data.Dataset:
        state = np.random.SeedSequence([seed, epoch, process_index]).generate_state(2)
        shuffle_seed, augment_seed = (int(s) % 2**31 for s in state)
        ds = data.records(
            process_index,
            process_count,
            drop_remainder=True,
            shuffle_seed=shuffle_seed,
            shuffle_buffer=shuffle_buffer,
        )
        ds = ds.take(steps_per_epoch * local).enumerate().skip(skip_batches * local)
        key = tf.constant(augment_seed, tf.int64)
        ds = ds.map(
            plain(lambda i, record: example(record, tf.stack([key, i]))),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return _finish(ds.batch(local, drop_remainder=True))

    def produce() -> Iterator[dict[str, np.ndarray]]:
        for epoch in itertools.count(first_epoch):
            yield from epoch_batches(epoch, skip if epoch == first_epoch else 0).as_numpy_iterator()

    return produce()


def eval_batches(
    data: ImageSplit,
    batch_size: int,
    recipe: Recipe = Recipe(),
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over this process's shard; `batch_size` is global.

    Padding examples (mask 0) fill the last batches, so every process yields the same number
    of equally shaped batches and each example has mask 1 exactly once over all processes.
    """
    tf = import_tf()
    local = _local_batch_size(batch_size, process_count)
    most = -(-data.info.num_examples // process_count)  # Largest shard of an even split.
    num_batches = -(-most // local)
    size = recipe.image_size

    def example(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        ex = data.load(record)
        image = _eval_image(ex["image"], size, recipe.eval_crop_fraction)
        return {"image": image, "label": ex["label"], "mask": tf.constant(1.0)}

    ds = data.records(process_index, process_count, drop_remainder=False)
    if cardinality(ds) > most:
        raise ValueError(f"shard of {cardinality(ds)} examples; an even split has at most {most}")
    ds = ds.map(plain(example), num_parallel_calls=tf.data.AUTOTUNE)
    pad = {
        "image": tf.zeros([size, size, 3], tf.uint8),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    ds = ds.take(num_batches * local).batch(local)
    return _finish(ds).as_numpy_iterator()


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by {process_count} processes"
        )
    return global_batch_size // process_count


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    tf = import_tf()
    options = tf.data.Options()
    options.deterministic = True
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    tf = import_tf()
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _rgb(image: tf.Tensor) -> tf.Tensor:
    """A decoded uint8 image with three channels (grey is repeated)."""
    tf = import_tf()
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return tf.ensure_shape(image, [None, None, 3])


def _decode_and_crop(image: tf.Tensor, window: Any) -> tf.Tensor:
    """Decodes only `window(shape) = [top, left, height, width]` of a JPEG; other formats, or
    images stored decoded, are cropped after decoding."""
    tf = import_tf()

    def crop(x: tf.Tensor) -> tf.Tensor:
        top, left, h, w = tf.unstack(window(tf.shape(x)[:2]))
        return x[top : top + h, left : left + w]

    if image.dtype != tf.string:
        return crop(_rgb(image))

    def jpeg() -> tf.Tensor:
        box = window(tf.image.extract_jpeg_shape(image)[:2])
        return tf.ensure_shape(
            tf.image.decode_and_crop_jpeg(image, box, channels=3), [None, None, 3]
        )

    def other() -> tf.Tensor:
        decoded = tf.io.decode_image(image, channels=3, expand_animations=False)
        return crop(tf.ensure_shape(decoded, [None, None, 3]))

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image), jpeg, other), [None, None, 3])


def _random_window(
    shape: tf.Tensor,
    seed: tf.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> tf.Tensor:
    """Random resized crop window: area fraction ~ U(scale), log aspect ratio ~ U(log ratio).

    The first of `attempts` candidates that fits wins; if none does, a centre crop of the whole
    image with its aspect ratio clamped to `ratio`.
    """
    tf = import_tf()
    h, w = tf.unstack(tf.cast(shape, tf.float32))
    u = tf.random.stateless_uniform([4, attempts], seed)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
    cw = tf.round(tf.sqrt(area * aspect))
    ch = tf.round(tf.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    k = tf.argmax(tf.cast(fits, tf.int32))
    ch, cw = ch[k], cw[k]
    top = tf.floor(u[2][k] * (h - ch + 1))
    left = tf.floor(u[3][k] * (w - cw + 1))
    # Fallback: the largest centred crop with a clamped aspect ratio.
    image_ratio = w / h
    fh = tf.where(image_ratio < ratio[0], tf.round(w / ratio[0]), h)
    fw = tf.where(image_ratio > ratio[1], tf.round(h * ratio[1]), w)
    found = tf.reduce_any(fits)
    window = tf.where(
        found,
        tf.stack([top, left, ch, cw]),
        tf.stack([tf.floor((h - fh) / 2), tf.floor((w - fw) / 2), fh, fw]),
    )
    return tf.cast(window, tf.int32)


def _whole_window(shape: tf.Tensor) -> tf.Tensor:
    tf = import_tf()
    return tf.stack([0, 0, shape[0], shape[1]])


def _resize(image: tf.Tensor, size: Any) -> tf.Tensor:
    """Antialiased bicubic resize (as PIL's), back to uint8."""
    tf = import_tf()
    return _to_uint8(tf.image.resize(image, size, method="bicubic", antialias=True))


def _eval_image(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Resizes the shorter side to floor(size / crop_fraction), then takes the centre square."""
    tf = import_tf()
    x = _decode_and_crop(image, _whole_window)
    h, w = tf.unstack(tf.cast(tf.shape(x)[:2], tf.float32))
    short = float(math.floor(size / crop_fraction))
    nh = tf.where(h <= w, short, tf.floor(short * h / w))
    nw = tf.where(h <= w, tf.floor(short * w / h), short)
    x = _resize(x, tf.cast(tf.stack([nh, nw]), tf.int32))
    top = tf.cast(tf.round((nh - size) / 2), tf.int32)
    left = tf.cast(tf.round((nw - size) / 2), tf.int32)
    return tf.ensure_shape(x[top : top + size, left : left + size], [size, size, 3])


def _train_image(image: tf.Tensor, seed: tf.Tensor, recipe: Recipe, info: DatasetInfo) -> tf.Tensor:
    """Crop, flip, RandAugment, erase: every random choice keyed by the stateless `seed`."""
    tf = import_tf()
    size = recipe.image_size
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    if recipe.random_crop:

        def window(shape: tf.Tensor) -> tf.Tensor:
            return _random_window(shape, seeds[0], recipe.crop_scale, recipe.crop_ratio)

        x = _resize(_decode_and_crop(image, window), [size, size])
    else:
        x = _eval_image(image, size, recipe.eval_crop_fraction)
    x = tf.ensure_shape(x, [size, size, 3])
    if recipe.flip:
        flip = tf.random.stateless_uniform([], seeds[1]) < 0.5
        x = tf.cond(flip, lambda: x[:, ::-1], lambda: x)
    if recipe.randaugment_ops:
        x = randaugment.rand_augment(
            x,
            seeds[2],
            num_ops=recipe.randaugment_ops,
            magnitude=recipe.randaugment_magnitude,
            magnitude_std=recipe.randaugment_std,
            fill=tuple(round(255 * m) for m in info.mean),
        )
    if recipe.erasing_prob:
        x = random_erasing(x, seeds[3], recipe.erasing_prob, info.mean, info.std)
    return x


def random_erasing(
    image: tf.Tensor,
    seed: tf.Tensor,
    prob: float,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> tf.Tensor:
    """With probability `prob`, fills one random box of a uint8 [H, W, 3] image with noise.

    Box area fraction ~ U(area), log aspect ~ U(log ratio), first of `attempts` that fits
    (none fits: no erasing). The noise is N(255 mean, 255 std) per pixel and channel, which
    normalises to N(0, 1), the reference's 'pixel' mode.
    """
    tf = import_tf()
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    h, w = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
    u = tf.random.stateless_uniform([4, attempts], seeds[0])
    target = h * w * (area[0] + (area[1] - area[0]) * u[0])
    aspect = tf.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    eh = tf.round(tf.sqrt(target * aspect))
    ew = tf.round(tf.sqrt(target / aspect))
    fits = (eh < h) & (ew < w)
    k = tf.argmax(tf.cast(fits, tf.int32))
    eh, ew = eh[k], ew[k]
    top = tf.floor(u[2][k] * (h - eh + 1))
    left = tf.floor(u[3][k] * (w - ew + 1))
    erase = tf.reduce_any(fits) & (tf.random.stateless_uniform([], seeds[1]) < prob)

    def erased() -> tf.Tensor:  # Noise for the box only: most images keep most pixels.
        y0, x0, bh, bw = (tf.cast(v, tf.int32) for v in (top, left, eh, ew))
        noise = tf.random.stateless_normal(tf.stack([bh, bw, 3]), seeds[2])
        noise = _to_uint8(255.0 * (noise * tf.constant(std) + tf.constant(mean)))
        padding = [[y0, tf.shape(image)[0] - y0 - bh], [x0, tf.shape(image)[1] - x0 - bw], [0, 0]]
        inside = tf.pad(tf.ones([bh, bw, 1], tf.bool), padding[:2] + [[0, 0]])
        return tf.where(inside, tf.pad(noise, padding), image)

    return tf.cond(erase, erased, lambda: image)
