"""The exported model as one file that needs jax alone: a serialized `jax.export` artifact
(StableHLO) of the forward pass, weights included as constants, batch dimension symbolic,
lowered for CPU, CUDA and TPU.

Input: float32 NHWC images, normalised as `model.json`'s "input" says; output: logits.
`scripts/run_exported.py` loads and runs it without importing amap_jax. A model that drops
tokens is exported with its masked forward (the same logits; the dropping needs the host
between segments, see `models.tokens.predict`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax import models
from amap_jax.io import paths
from amap_jax.models.arch import Arch

FILE = "forward.jax"
PLATFORMS = ("cpu", "cuda", "tpu")


def serialize(arch: Arch, params) -> bytes:
    model = models.build(arch)
    params = jax.tree.map(np.asarray, params)
    forward = jax.jit(lambda images: model.apply({"params": params}, images))
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct(
        (batch, arch.image_size, arch.image_size, arch.in_chans), jnp.float32
    )
    return bytes(jax.export.export(forward, platforms=PLATFORMS)(spec).serialize())


def write(directory: str, arch: Arch, params) -> str:
    """Writes DIRECTORY/forward.jax (atomically: a partial file is never left under its name)."""
    path = paths.join(directory, FILE)
    paths.write_atomic(path, serialize(arch, params))
    return path


def exists(directory: str) -> bool:
    return paths.exists(paths.join(directory, FILE))


def load(directory: str):
    """The artifact's forward pass: float32 [N, H, W, C] -> [N, classes] logits.
    (`scripts/run_exported.py` holds the same few lines, so that it needs no amap_jax.)"""
    return jax.export.deserialize(bytearray(paths.read_bytes(paths.join(directory, FILE)))).call
