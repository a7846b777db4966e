"""Offline image classification data: random-access sources and deterministic batching."""

from amap_jax.data.batching import (
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
