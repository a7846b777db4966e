"""Self-describing exported models: `model.json` (architecture, input, classes) + weights.

`model.json` is written last, so its presence marks a finished export.
"""

from __future__ import annotations

import functools

import jax

from amap_jax import models, xla_cpu
from amap_jax.io import artifact, paths
from amap_jax.models.arch import Arch, arch_from_dict
from amap_jax.train import checkpoint, parallel

FORMAT = 1
MODEL_JSON = "model.json"
WEIGHTS = "params"


def is_finished(directory: str) -> bool:
    return paths.exists(paths.join(directory, MODEL_JSON))


def save_pruned(directory: str, arch: Arch, params, class_names=(), **extra) -> None:
    """Writes an exported model; refuses to overwrite a finished export. With several
    processes every one must call it (orbax's save is collective); the chief writes.
    `class_names` (one per class, by label) let predictions name their classes."""
    class_names = [str(c) for c in class_names]
    if class_names and len(class_names) != arch.num_classes:
        raise ValueError(f"{len(class_names)} class names for {arch.num_classes} classes")
    if is_finished(directory):
        raise FileExistsError(
            f"{directory} already holds a finished export; choose another directory"
        )
    weights = paths.join(directory, WEIGHTS)
    if parallel.is_chief():
        paths.makedirs(directory)
        if paths.exists(weights):  # left by an interrupted export: never finished, redo it
            paths.rmtree(weights)
    parallel.barrier("export directory ready")
    checksums = checkpoint.save_tree(weights, params)
    if not parallel.is_chief():
        parallel.barrier("export written")
        return
    meta = {
        "format": FORMAT,
        "arch": arch.to_dict(),
        "input": {
            "image_size": arch.image_size,
            "channels": arch.in_chans,
            "mean": list(arch.mean),
            "std": list(arch.std),
            "layout": "NHWC, float32, (pixel/255 - mean) / std",
        },
        "num_classes": arch.num_classes,
        **({"class_names": class_names} if class_names else {}),
        "weights_sha256": checksums,
        **extra,
    }
    checkpoint.write_json(paths.join(directory, MODEL_JSON), meta)
    parallel.barrier("export written")


def read_meta(directory: str) -> dict:
    """`model.json` of a finished export, with its architecture parsed; one-line errors."""
    path = paths.join(directory, MODEL_JSON)
    if not paths.exists(path):
        raise FileNotFoundError(f"{directory} holds no finished export (no {MODEL_JSON})")
    try:
        meta = checkpoint.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: unsupported export format {got!r}")
    try:
        meta["arch"] = arch_from_dict(meta["arch"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: broken architecture ({e})") from None
    return meta


def read_arch(directory: str) -> Arch:
    return read_meta(directory)["arch"]


def load_pruned(directory: str) -> tuple:
    """(model, variables) such that `model.apply(variables, images)` gives logits.

    The weights must be the ones `model.json` describes: same checksums, same shapes."""
    meta = read_meta(directory)
    arch = meta["arch"]
    model = models.build(arch)
    target = jax.eval_shape(model.init, jax.random.key(0), models.dummy_input(arch))["params"]
    weights = paths.join(directory, WEIGHTS)
    checkpoint.check_shapes(weights, target, f"{paths.join(directory, MODEL_JSON)}")
    params = checkpoint.load_tree(weights, target, meta.get("weights_sha256"))
    return model, {"params": params}


def forward(directory: str):
    """The export's `images -> logits`: its `forward.jax` artifact when there is one, else the
    model `load_pruned` gives, jitted with the CPU kernel set the export was measured fastest
    with (`model.json`'s `cpu_kernels`; the default set elsewhere)."""
    if artifact.exists(directory):
        fn = artifact.load(directory)
    else:
        model, variables = load_pruned(directory)
        fn = functools.partial(model.apply, variables)
    return xla_cpu.jit(fn, kernels(directory))


def kernels(directory: str) -> str:
    """`model.json`'s CPU kernel set; the default one for a set this version does not know."""
    name = read_meta(directory).get("cpu_kernels", "default")
    return name if name in xla_cpu.SETS else "default"
