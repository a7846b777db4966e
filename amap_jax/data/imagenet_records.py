"""Where ImageNet's records come from: a prepared tfds split or a folder of images, each
process reading only its own contiguous part of the split (`tfds.even_splits`, or a slice of a
folder's file list), of equal size for training. Records are cheap (encoded bytes or a path);
`load` turns one into an image and a label, and `imagenet` decodes and augments it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from amap_jax.data.sources import DatasetInfo, DatasetNotFoundError
from amap_jax.data.tf import cardinality, import_tf, plain

if TYPE_CHECKING:
    import tensorflow as tf

# Every split reports ImageNet's statistics: the normalisation the (pretrained) models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_FOLDER_ORDER_SEED = 0  # A folder is listed in class order; shards need a fixed mix of classes.


class ImageSplit(Protocol):
    """One split, read as cheap records; `load` turns a record into an image and a label.

    The image is encoded bytes (decoded later, only the crop of a JPEG) or a decoded uint8 array.
    """

    info: DatasetInfo

    def records(
        self,
        process_index: int,
        process_count: int,
        *,
        drop_remainder: bool,
        shuffle_seed: int | None = None,
        shuffle_buffer: int = 0,
    ) -> tf.data.Dataset: ...

    def load(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]: ...


def open_imagenet(
    split: str,
    data_dir: str | None = None,
    *,
    image_folder: str | None = None,
    name: str = "imagenet2012",
) -> ImageSplit:
    """A prepared tfds split (never downloads), or `image_folder/<split>/<class>/*.jpeg`."""
    if image_folder is not None:
        return _FolderSplit(image_folder, split)
    return _TfdsSplit(name, split, data_dir)


class _TfdsSplit:
    """A tfds image classification split from prepared files, images left encoded."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import_tf()  # Before tfds touches TensorFlow, so GPUs are hidden from it.
        import tensorflow_datasets as tfds

        try:
            self._builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise DatasetNotFoundError(f"{name!r} is not a registered tfds dataset") from e
        features = self._builder.info.features
        if "image" not in features or "label" not in features:
            raise ValueError(f"tfds {name} has features {list(features)}; need image and label")
        self._split = split
        self._decoders = None
        if isinstance(features["image"], tfds.features.Image):
            self._decoders = {"image": tfds.decode.SkipDecoding()}
        try:  # Fails at once when the files are missing; under tfds.testing.mock_data it works.
            num_examples = cardinality(self._dataset(split))
        except AssertionError as e:
            if self._builder.is_prepared():
                raise
            where = data_dir or "the default tfds data_dir (~/tensorflow_datasets)"
            manual = " with the ILSVRC2012 tars in DIR/downloads/manual" * (name == "imagenet2012")
            raise DatasetNotFoundError(
                f"tfds {name} is not prepared in {where}; run `tfds build {name} --data_dir DIR`"
                f"{manual} and pass data_dir=DIR, or pass image_folder=ROOT holding "
                "ROOT/<split>/<class>/*.jpeg"
            ) from e
        self.info = DatasetInfo(
            name=name,
            split=split,
            num_examples=num_examples,
            num_classes=int(features["label"].num_classes),
            image_shape=(None, None, 3),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            class_names=tuple(features["label"].names),
        )

    def _dataset(self, split: Any, shuffle_seed: int | None = None) -> tf.data.Dataset:
        import tensorflow_datasets as tfds

        read_config = tfds.ReadConfig(
            shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False, try_autocache=False
        )
        return self._builder.as_dataset(
            split=split,
            decoders=self._decoders,
            shuffle_files=shuffle_seed is not None,
            read_config=read_config,
        )

    def records(
        self,
        process_index: int,
        process_count: int,
        *,
        drop_remainder: bool,
        shuffle_seed: int | None = None,
        shuffle_buffer: int = 0,
    ) -> tf.data.Dataset:
        import tensorflow_datasets as tfds

        split = self._split
        if process_count > 1:
            splits = tfds.even_splits(split, process_count, drop_remainder=drop_remainder)
            split = splits[process_index]
        ds = self._dataset(split, shuffle_seed).map(
            plain(lambda ex: {"image": ex["image"], "label": ex["label"]})
        )
        if shuffle_seed is not None and shuffle_buffer > 1:
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds

    def load(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        tf = import_tf()
        return {"image": record["image"], "label": tf.cast(record["label"], tf.int32)}


class _FolderSplit:
    """`root/<split>/<class>/*.{jpeg,jpg,png}`; classes are the sorted folder names of all splits.

    The same layout and label order as `tfds.ImageFolder`, read directly so that a process
    lists only file names and opens only the files of its own shard, after any skip.
    """

    def __init__(self, root: str, split: str):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise DatasetNotFoundError(
                f"{split_dir} not found; image_folder needs ROOT/<split>/<class>/*.jpeg"
            )
        classes = sorted({c for s in _subdirs(root) for c in _subdirs(os.path.join(root, s))})
        paths, labels = [], []
        for label, c in enumerate(classes):
            folder = os.path.join(split_dir, c)
            if not os.path.isdir(folder):
                continue
            names = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTENSIONS))
            paths += [os.path.join(folder, f) for f in names]
            labels += [label] * len(names)
        if not paths:
            raise DatasetNotFoundError(f"no .jpeg/.jpg/.png images under {split_dir}/<class>/")
        order = np.random.default_rng(_FOLDER_ORDER_SEED).permutation(len(paths))
        self._paths = np.asarray(paths)[order]
        self._labels = np.asarray(labels, np.int32)[order]
        self.info = DatasetInfo(
            name=os.path.basename(os.path.normpath(root)),
            split=split,
            num_examples=len(paths),
            num_classes=len(classes),
            image_shape=(None, None, 3),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            class_names=tuple(classes),
        )

    def records(
        self,
        process_index: int,
        process_count: int,
        *,
        drop_remainder: bool,
        shuffle_seed: int | None = None,
        shuffle_buffer: int = 0,
    ) -> tf.data.Dataset:
        tf = import_tf()
        n = len(self._paths)
        if drop_remainder:
            size = n // process_count
            lo, hi = process_index * size, (process_index + 1) * size
        else:
            lo, hi = (process_index * n // process_count, (process_index + 1) * n // process_count)
        ds = tf.data.Dataset.from_tensor_slices(
            {"path": self._paths[lo:hi], "label": self._labels[lo:hi]}
        )
        if shuffle_seed is not None:  # File names are small: shuffle the whole shard.
            ds = ds.shuffle(hi - lo, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds

    def load(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        tf = import_tf()
        return {"image": tf.io.read_file(record["path"]), "label": record["label"]}


def _subdirs(path: str) -> list[str]:
    return [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
