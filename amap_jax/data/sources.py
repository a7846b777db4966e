"""Random-access image classification sources that never touch the network.

A source maps integer indices to numpy batches, so the input pipeline can be a pure function of
(seed, step): that is what makes training resume exactly. Datasets come from files already on the
machine (Debian's Fashion-MNIST, sklearn's digits) or from tfds data prepared in array_record
format; a missing dataset fails at once with a one-line `DatasetNotFoundError`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import os
import re
import zlib
from typing import Any, Protocol, runtime_checkable

import numpy as np

FASHION_MNIST_ENV = "AMAP_FASHION_MNIST_DIR"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_DIGITS_NUM_TRAIN = 1497

# Per-channel statistics, in [0, 1] pixel units, for tfds datasets too large to scan.
_KNOWN_STATS = {
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}
_STATS_SAMPLE = 2048  # Examples read to estimate statistics of other tfds datasets.


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on this machine; the message says how to get it (one line)."""


class DataError(ValueError):
    """A data file that is there but wrong: truncated, not what it claims, labels out of range."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one split; mean/std are per channel, from the train split."""

    name: str
    split: str
    num_examples: int
    num_classes: int
    image_shape: tuple[int | None, int | None, int]  # None: size varies across images.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()  # By label; empty when the dataset names none.


@runtime_checkable
class Source(Protocol):
    """Random access to examples: `get` returns image uint8 [n,H,W,C] and label int32 [n]."""

    info: DatasetInfo

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class ArraySource:
    """A split held in memory as numpy arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, info: DatasetInfo):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.astype(np.int32, copy=False)
        self.info = info

    def __len__(self) -> int:
        return len(self.images)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        return {"image": self.images[indices], "label": self.labels[indices]}


class TfdsSource:
    """A tfds dataset prepared as array_record, read with `tfds.data_source` (no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        self._ds = _open_tfds(name, split, data_dir)
        features = self._ds.dataset_info.features
        if "image" not in features or "label" not in features:
            raise ValueError(f"tfds {name} has features {list(features)}; need 'image' and 'label'")
        shape = tuple(features["image"].shape)
        self._add_channel = len(shape) == 2
        mean, std = _tfds_stats(name, data_dir)
        self.info = DatasetInfo(
            name=name,
            split=split,
            num_examples=len(self._ds),
            num_classes=int(features["label"].num_classes),
            image_shape=shape + (1,) if self._add_channel else shape,
            mean=mean,
            std=std,
            class_names=tuple(features["label"].names),
        )

    def __len__(self) -> int:
        return len(self._ds)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = self._read([int(i) for i in np.asarray(indices).reshape(-1)])
        try:
            images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
        except ValueError as e:
            raise ValueError(
                f"{self.info.name}: images in one batch differ in shape "
                f"({self.info.image_shape}); variable-size datasets need a resizing decoder, "
                "which is not implemented yet"
            ) from e
        if self._add_channel:
            images = images[..., None]
        labels = np.asarray([r["label"] for r in records], np.int32)
        return {"image": images, "label": labels}

    def _read(self, keys: list[int]) -> list[dict[str, Any]]:
        try:
            return list(self._ds.__getitems__(keys))
        except TypeError:
            # tfds.testing.mock_data installs an unbound `__getitems__`; read one by one instead.
            return [self._ds[k] for k in keys]


def load_source(name: str, split: str, data_dir: str | None = None) -> Source:
    """Opens `split` of dataset `name` from local files only; never downloads."""
    if name == "fashion_mnist":
        if data_dir is not None and _tfds_prepared(name, data_dir):
            try:
                return TfdsSource(name, split, data_dir)
            except DatasetNotFoundError as e:
                logging.warning("Ignoring tfds fashion_mnist in %s: %s", data_dir, e)
        directory = os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR)
        return _array_source(name, split, _load_fashion_mnist(directory))
    if name == "digits":
        return _array_source(name, split, _load_digits())
    return TfdsSource(name, split, data_dir)


def parse_split(split: str, num_examples: dict[str, int]) -> tuple[str, slice]:
    """Parses 'train', 'train[:1000]', 'train[-5000:]', 'train[10%:90%]' for in-memory sets."""
    m = re.fullmatch(r"(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?", split.replace(" ", ""))
    if m is None or m.group(1) not in num_examples:
        raise ValueError(f"Bad split {split!r}; known splits: {sorted(num_examples)}")
    base, start, stop = m.groups()
    n = num_examples[base]

    def bound(s: str | None) -> int | None:
        if s is None:
            return None
        return round(n * int(s[:-1]) / 100) if s.endswith("%") else int(s)

    return base, slice(bound(start), bound(stop))


@dataclasses.dataclass(frozen=True)
class _InMemory:
    """Every split of a small dataset, plus its train statistics, cached once per process."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def create(
        cls,
        splits: dict[str, tuple[np.ndarray, np.ndarray]],
        class_names: tuple[str, ...],
        name: str,
    ) -> _InMemory:
        num_classes = len(class_names)
        for split, (x, y) in splits.items():  # checked once, before any slicing
            if len(x) != len(y):
                raise DataError(f"{name} {split}: {len(x)} images but {len(y)} labels")
            if len(y) and (y.min() < 0 or y.max() >= num_classes):
                bad = y[(y < 0) | (y >= num_classes)][0]
                raise DataError(
                    f"{name} {split}: label {int(bad)} outside [0, {num_classes}) "
                    f"({int(((y < 0) | (y >= num_classes)).sum())} such labels)"
                )
        splits = {k: (_frozen(x), _frozen(y.astype(np.int32))) for k, (x, y) in splits.items()}
        mean, std = _channel_stats(_pixel_counts(splits["train"][0]))
        return cls(splits, mean, std, class_names)


def _array_source(name: str, split: str, data: _InMemory) -> ArraySource:
    base, sl = parse_split(split, {k: len(v[1]) for k, v in data.splits.items()})
    images, labels = (a[sl] for a in data.splits[base])
    info = DatasetInfo(
        name=name,
        split=split,
        num_examples=len(labels),
        num_classes=data.num_classes,
        image_shape=tuple(images.shape[1:]),
        mean=data.mean,
        std=data.std,
        class_names=data.class_names,
    )
    return ArraySource(images, labels, info)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # Cached arrays are shared by every source of the process.
    return array


@functools.cache
def _load_fashion_mnist(directory: str) -> _InMemory:
    splits = {}
    for split, files in _FASHION_FILES.items():
        image_file, label_file = (os.path.join(directory, f) for f in files)
        for path in (image_file, label_file):
            if not os.path.isfile(path):
                raise DatasetNotFoundError(
                    f"fashion_mnist: {path} not found; run `apt-get install -y "
                    f"dataset-fashion-mnist`, set ${FASHION_MNIST_ENV} to a directory with the IDX "
                    ".gz files, or pass a data_dir holding a prepared tfds fashion_mnist"
                )
        images, labels = _read_idx(image_file), _read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(
                f"{image_file} / {label_file}: expected images [N,H,W] and labels [N], got "
                f"{images.shape} and {labels.shape}"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels"
            )
        splits[split] = (images[..., None], labels)
    return _InMemory.create(splits, _FASHION_MNIST_CLASSES, name="fashion_mnist")


def _read_idx(path: str) -> np.ndarray:
    """Parses an IDX file: 0x0000, dtype code 0x08 (uint8), rank, big-endian int32 dims."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path}: truncated or not a gzip file ({e})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an IDX uint8 file (header {data[:4]!r})")
    rank = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", count=rank, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: header says {dims} ({int(np.prod(dims))} bytes), file has {body.size}"
        )
    return body.reshape(dims)


@functools.cache
def _load_digits() -> _InMemory:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target
    n = _DIGITS_NUM_TRAIN
    splits = {"train": (images[:n], labels[:n]), "test": (images[n:], labels[n:])}
    return _InMemory.create(splits, tuple(str(d) for d in range(10)), name="digits")


def _pixel_counts(images: np.ndarray) -> np.ndarray:
    """Histogram [C, 256] of uint8 pixel values: exact statistics without a float copy."""
    images = np.asarray(images, np.uint8)
    if images.ndim == 2:
        images = images[..., None]
    return np.stack(
        [np.bincount(images[..., c].ravel(), minlength=256) for c in range(images.shape[-1])]
    )


def _channel_stats(counts: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    values = np.arange(256) / 255.0
    total = counts.sum(axis=1)
    mean = counts @ values / total
    var = counts @ values**2 / total - mean**2
    return tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(np.maximum(var, 0)))


def _tfds_prepared(name: str, data_dir: str | None) -> bool:
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir).is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        return False


def _open_tfds(name: str, split: str, data_dir: str | None) -> Any:
    """`tfds.data_source` with download=False, turning its many failure modes into one error."""
    import tensorflow_datasets as tfds

    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    build = f"on a machine with network run `tfds build {name} --data_dir DIR "
    build += "--file_format=array_record` and pass data_dir=DIR"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotFoundError(f"{name!r} is not a registered tfds dataset") from e
    except (KeyError, FileNotFoundError, NotImplementedError) as e:
        if not _tfds_prepared(name, data_dir):
            raise DatasetNotFoundError(f"tfds {name} is not prepared in {where}; {build}") from e
        if isinstance(e, NotImplementedError):
            raise DatasetNotFoundError(
                f"tfds {name} in {where} is not in array_record format; {build}"
            ) from e
        raise


@functools.cache
def _tfds_stats(name: str, data_dir: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if name in _KNOWN_STATS:
        return _KNOWN_STATS[name]
    train = _open_tfds(name, "train", data_dir)
    keys = np.linspace(0, len(train) - 1, min(len(train), _STATS_SAMPLE)).astype(int)
    return _channel_stats(sum(_pixel_counts(train[int(k)]["image"]) for k in keys))
