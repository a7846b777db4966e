"""TensorFlow for the tf.data pipelines, imported only when one is used: the rest of amap_jax
runs without it."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def import_tf() -> Any:
    """TensorFlow, for tf.data only: GPUs are hidden from it so jax keeps the accelerator."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices elsewhere.
        pass
    return tf
