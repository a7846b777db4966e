"""The exported model as one file that needs jax alone: a serialized `jax.export` artifact
(StableHLO) of the forward pass, weights included as constants, batch dimension symbolic,
lowered for CPU, CUDA and TPU.

Input: float32 NHWC images, normalised as `model.json`'s "input" says; output: logits.
`scripts/run_exported.py` loads and runs it without importing amap_jax. A model that drops
tokens is exported with its dropping forward (`models.tokens.dropping`): one program that picks,
on the device, the segment compiled for each pruning point's kept count (its `token_buckets`),
so the artifact alone gets the token speedup. Its SHA-256 is in the export's manifest
(`io.pruned`), checked on every load.
"""

from __future__ import annotations

import hashlib
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax import models
from amap_jax.io import paths
from amap_jax.models import tokens
from amap_jax.models.arch import Arch

FILE = "forward.jax"
PLATFORMS = ("cpu", "cuda", "tpu")


def check_available() -> None:
    """A one-line ImportError before a run starts, not after it trained: jax.export serialises
    with flatbuffers, which jax does not install."""
    if importlib.util.find_spec("flatbuffers") is None:
        raise ImportError(
            "writing export/forward.jax needs the flatbuffers package: pip install flatbuffers "
            "(or --config.export_artifact=false)"
        )


def serialize(arch: Arch, params) -> bytes:
    """The forward pass of `arch` with `params` as a jax.export artifact: the masked forward
    of a model without token points, else the dropping one (`models.tokens.dropping` with the
    architecture's buckets)."""
    model = models.build(arch)
    params = jax.tree.map(np.asarray, params)
    if arch.token_points:
        drop = tokens.dropping(model, tokens.buckets_of(arch))
        forward = jax.jit(lambda images: drop({"params": params}, images)[0])
    else:
        forward = jax.jit(lambda images: model.apply({"params": params}, images))
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct(
        (batch, arch.image_size, arch.image_size, arch.in_chans), jnp.float32
    )
    return bytes(jax.export.export(forward, platforms=PLATFORMS)(spec).serialize())


def write(directory: str, arch: Arch, params) -> str:
    """Writes DIRECTORY/forward.jax (atomically: a partial file is never left under its name);
    returns its SHA-256, for the export's manifest."""
    data = serialize(arch, params)
    path = paths.join(directory, FILE)
    paths.ensure_space(path, len(data))
    paths.write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def exists(directory: str) -> bool:
    return paths.exists(paths.join(directory, FILE))


def load(directory: str, sha256: str | None = None):
    """The artifact's forward pass: float32 [N, H, W, C] -> [N, classes] logits. With `sha256`
    (the export's manifest), a file that is not the one written is refused in one line.
    (`scripts/run_exported.py` holds the same few lines, so that it needs no amap_jax.)"""
    path = paths.join(directory, FILE)
    if not paths.exists(path):
        raise FileNotFoundError(f"{path} is missing; export again with export_artifact=true")
    data = paths.read_bytes(path)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"{path} does not match its checksum in model.json (corrupt or changed after "
            "export); restore it or export again"
        )
    try:
        return jax.export.deserialize(bytearray(data)).call
    except Exception as e:  # a truncated or foreign file fails deep in flatbuffers
        raise ValueError(f"{path} is not a jax.export artifact ({type(e).__name__})") from None
