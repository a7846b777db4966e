"""Shared helpers for the model and pruning tests: random params, random balanced masks."""

from __future__ import annotations

import importlib.util
import os
import tempfile

# One persistent compilation cache for every test process and the train.py subprocesses they
# start: the same small models are compiled by many tests (set before jax is imported).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "amap_jax_test_jit_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import flax.linen as nn  # noqa: E402
import jax
import numpy as np
import pytest

from amap_jax.methods import projection
from amap_jax.methods.amap import group_shapes
from amap_jax.models import dummy_input
from amap_jax.models.arch import ViTArch
from amap_jax.models.vit import ViT

# Eight fake CPU devices for the data-parallel tests; set before any backend starts.
jax.config.update("jax_num_cpu_devices", 8)


def param_shapes(model: ViT | nn.Module, *args):
    """Abstract variables of `model` (tracing only; nothing is initialised or compiled)."""
    if not args:
        args = (dummy_input(model.arch),)
    return jax.eval_shape(model.init, jax.random.key(0), *args)


def random_params(shapes, seed: int, noise: float = 0.2):
    """Random numpy params in the shape of `shapes`, with no leaf at its (often trivial) init.

    Kernels are drawn as N(0, 1/fan_in), which keeps activations O(1) (the default init with
    std 0.02 and a zero head gives near-constant logits that would hide errors). LayerNorm scales
    and reweight scales are 1 + N(0, noise^2); every other leaf (biases, cls and position
    embeddings, focused-attention `scale` and `positional_encoding`) is N(0, noise^2).
    Drawn with numpy: cheaper than compiling the model's initialisers.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if names[-1] == "kernel":
            return z / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
        if names[-1].startswith("reweight") or (
            names[-1] == "scale" and len(names) > 1 and names[-2].startswith("norm")
        ):
            return 1.0 + noise * z
        return noise * z

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_images(arch: ViTArch, batch: int, seed: int) -> np.ndarray:
    shape = (batch, arch.image_size, arch.image_size, arch.in_chans)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def calibration_of(images):
    """A method's `calibration` callable over fixed images (labels 0: no test here needs them)."""
    from amap_jax.methods.base import CalibrationBatch

    images = np.asarray(images)
    return lambda n: CalibrationBatch(images[:n], np.zeros(min(n, len(images)), np.int32))


def random_balanced_mask(
    rng: np.random.Generator, heads: int, width: int, k: int | None = None, same: bool = False
) -> np.ndarray:
    """[heads, width] 0/1 mask with the same count k in every head (random k in [1, width]).

    `same=True` keeps the same channels in every head.
    """
    if k is None:
        k = int(rng.integers(1, width + 1))
    mask = np.zeros((heads, width), np.float32)
    first = rng.choice(width, size=k, replace=False)
    for h in range(heads):
        mask[h, first if same else rng.choice(width, size=k, replace=False)] = 1.0
    return mask


def random_masks(arch: ViTArch, rng: np.random.Generator, same_v: bool = False):
    """Random balanced masks for every group of every block, as {'block_i': {group: mask}}."""
    return {
        f"block_{i}": {
            g: random_balanced_mask(rng, h, w, same=same_v and g == "v")
            for g, (h, w) in group_shapes(block).items()
        }
        for i, block in enumerate(arch.blocks)
    }


def logits_for(masks):
    """Indicator logits that reproduce `masks` (a tree of binary masks)."""
    return jax.tree.map(projection.fixed_logits, masks)


def all_kept(arch: ViTArch):
    """Masks keeping every channel of every group."""
    return {
        f"block_{i}": {g: np.ones(s, np.float32) for g, s in group_shapes(block).items()}
        for i, block in enumerate(arch.blocks)
    }


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "tests", "data", "tiny_config.py")


def tiny_config():
    """The config of tests/data/tiny_config.py: the whole pipeline on digits in seconds."""
    spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def snapshot(directory) -> dict[str, bytes]:
    """Every file under `directory` by path, with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[path] = fh.read()
    return out


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One finished AMAP run of the tiny config, shared by the tests of a worker (read only:
    copy it before changing anything)."""
    from amap_jax import pipeline

    workdir = str(tmp_path_factory.mktemp("run"))
    return workdir, pipeline.run(tiny_config(), workdir)


def fake_latency(arch, attn_scale=1.0, mlp_scale=1.0, constant=1e-4):
    """A latency model with times that rise with every width (an MLP scale of 0: hidden
    units cost nothing): for tests that must not depend on how busy the machine is."""
    from amap_jax.latency import knots
    from amap_jax.pruning import cost

    attention, mlp = [], []
    for b in arch.blocks:
        xs, ys, hs = knots(b.qk_dim), knots(b.v_dim), knots(b.mlp_dim)
        grid = [[attn_scale * 1e-6 * (2 * q + v + q * v / 8) for v in ys] for q in xs]
        attention.append(cost.Table(xs, ys, tuple(map(tuple, grid))))
        mlp.append(cost.Table(hs, (), tuple(mlp_scale * 1e-7 * h + 1e-9 * h for h in hs)))
    return cost.Latency(tuple(attention), tuple(mlp), constant, 1, "float32", "fake")
