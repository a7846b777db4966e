"""A split as the training program consumes it, whatever reads it.

Small data sets (`load_source`) are random-access arrays batched on the host by index; ImageNet
and image folders are tf.data pipelines with the DeiT/Swin recipe (`data.imagenet`). Both give
the same three things: endless training batches from any step, one ordered evaluation pass,
and a calibration batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from amap_jax.data import batching, imagenet
from amap_jax.data.sources import Source, load_source

# Data sets read through tf.data with the ImageNet recipe (any prepared tfds image data set
# with variable-size images works the same way).
RECIPE_DATASETS = ("imagenet2012",)


class ArraySplit:
    def __init__(self, source: Source):
        self.source, self.info = source, source.info

    def __len__(self) -> int:
        return len(self.source)

    def train_batches(self, batch_size, *, seed, start_step, process_index, process_count):
        return batching.train_batches(
            self.source,
            batch_size,
            seed=seed,
            start_step=start_step,
            process_index=process_index,
            process_count=process_count,
        )

    def eval_batches(self, batch_size, process_index=0, process_count=1) -> Iterator:
        return batching.eval_batches(self.source, batch_size, process_index, process_count)

    def calibration_batch(self, n: int, seed: int | None = None) -> dict[str, np.ndarray]:
        """n examples ({"image", "label"}): the first n, or n drawn with `seed`."""
        n = min(n, len(self.source))
        if seed is None:
            index = np.arange(n)
        else:
            index = np.sort(np.random.default_rng(seed).choice(len(self.source), n, replace=False))
        batch = self.source.get(index)
        return {"image": batch["image"], "label": batch["label"]}

    def calibration_images(self, n: int) -> np.ndarray:
        return self.calibration_batch(n)["image"]


class RecipeSplit:
    """A tf.data split: augmented crops for training, resize + centre crop for evaluation."""

    def __init__(self, split: imagenet.ImageSplit, recipe: imagenet.Recipe):
        self.split, self.recipe = split, recipe
        size = recipe.image_size
        self.info = dataclasses.replace(split.info, image_shape=(size, size, 3))

    def __len__(self) -> int:
        return self.info.num_examples

    def train_batches(self, batch_size, *, seed, start_step, process_index, process_count):
        return imagenet.train_batches(
            self.split,
            batch_size,
            self.recipe,
            seed=seed,
            start_step=start_step,
            process_index=process_index,
            process_count=process_count,
        )

    def eval_batches(self, batch_size, process_index=0, process_count=1) -> Iterator:
        return imagenet.eval_batches(
            self.split,
            batch_size,
            self.recipe,
            process_index=process_index,
            process_count=process_count,
        )

    def calibration_batch(self, n: int, seed: int | None = None) -> dict[str, np.ndarray]:
        """n evaluation crops with their labels (deterministic, unaugmented): the first n, or
        with `seed` those after the first `seed % 8` batches of n (a tf.data split reads in
        order; skipping is what a seed can change cheaply)."""
        skip = 0 if seed is None else (seed % 8) * n
        images, labels, total = [], [], 0
        for batch in self.eval_batches(min(n, 256)):
            keep = batch["mask"] > 0
            images.append(batch["image"][keep])
            labels.append(batch["label"][keep])
            total += int(keep.sum())
            if total >= skip + n or not keep.all():
                break
        images, labels = np.concatenate(images), np.concatenate(labels)
        start = min(skip, max(len(images) - n, 0))
        return {"image": images[start : start + n], "label": labels[start : start + n]}

    def calibration_images(self, n: int) -> np.ndarray:
        return self.calibration_batch(n)["image"]


def open_split(data, split: str) -> ArraySplit | RecipeSplit:
    """`data` is the config's `data` section."""
    if data.image_folder or data.name in RECIPE_DATASETS:
        opened = imagenet.open_imagenet(
            split,
            data.data_dir or None,
            image_folder=data.image_folder or None,
            name=data.name,
        )
        return RecipeSplit(opened, recipe(data))
    return ArraySplit(load_source(data.name, split, data.data_dir or None))


def recipe(data) -> imagenet.Recipe:
    r = data.recipe
    return imagenet.Recipe(
        image_size=data.image_size or 224,
        random_crop=r.random_crop,
        flip=r.flip,
        randaugment_ops=r.randaugment_ops,
        randaugment_magnitude=r.randaugment_magnitude,
        randaugment_std=r.randaugment_std,
        erasing_prob=r.erasing_prob,
        eval_crop_fraction=r.eval_crop_fraction,
    )
