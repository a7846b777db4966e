"""Offline image classification data: random-access sources and a deterministic pipeline."""

from amap_jax.data.pipeline import (
    augment,
    batch_indices,
    eval_batches,
    preprocess,
    train_batches,
)
from amap_jax.data.sources import (
    ArraySource,
    DataError,
    DatasetInfo,
    DatasetNotFoundError,
    Source,
    TfdsSource,
    load_source,
    parse_split,
)

__all__ = [
    "ArraySource",
    "DatasetInfo",
    "DataError",
    "DatasetNotFoundError",
    "Source",
    "TfdsSource",
    "augment",
    "batch_indices",
    "eval_batches",
    "load_source",
    "parse_split",
    "preprocess",
    "train_batches",
]
