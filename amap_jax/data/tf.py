"""TensorFlow for the tf.data pipelines, imported only when one is used: the rest of amap_jax
runs without it."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorflow as tf


@functools.cache
def import_tf() -> Any:
    """TensorFlow, for tf.data only: GPUs are hidden from it so jax keeps the accelerator."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices elsewhere.
        pass
    return tf


def plain(fn: Any) -> Any:
    """Marks a tf.data function as plain graph code (tf.cond, no Python control flow on tensors),
    which skips autograph's source conversion: several times faster to trace."""
    return import_tf().autograph.experimental.do_not_convert(fn)


def cardinality(ds: tf.data.Dataset) -> int:
    """The dataset's length, which batching and sharding need known (not infinite, not
    filtered)."""
    n = int(ds.cardinality())
    if n < 0:
        raise ValueError("the dataset does not know its size")
    return n
