"""Self-describing exported models: `model.json` (architecture, input, classes) + weights, and
the `forward.jax` artifact.

`model.json` is written last, so its presence marks a finished export. Its `manifest` holds the
SHA-256 of every file of the export and of model.json's own fields: every load path (here,
`amap_jax.predict`, `scripts/run_exported.py`) checks what it reads against it and refuses a
changed or truncated file in one line naming it.
"""

from __future__ import annotations

import functools
import hashlib
import json

import jax

from amap_jax import models, xla_cpu
from amap_jax.io import artifact as artifact_lib
from amap_jax.io import hosts, paths, trees
from amap_jax.models import tokens
from amap_jax.models.arch import Arch, arch_from_dict

FORMAT = 2  # 2: with `manifest`; 1 (read too): weights checksums only
MODEL_JSON = "model.json"
WEIGHTS = "params"
MANIFEST = "manifest"


class ExportError(ValueError):
    """An export whose files or fields are not the ones it was written with."""


def fields_digest(meta: dict) -> str:
    """SHA-256 of model.json's fields but the manifest, as JSON with sorted keys (the same
    few lines are in scripts/run_exported.py, which needs no amap_jax)."""
    fields = {k: v for k, v in meta.items() if k != MANIFEST}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def is_finished(directory: str) -> bool:
    return paths.exists(paths.join(directory, MODEL_JSON))


def save_pruned(directory: str, arch: Arch, params, class_names=(), **extra) -> None:
    """Writes an exported model; refuses to overwrite a finished export. With several
    processes every one must call it (orbax's save is collective); the chief writes the rest.
    `class_names` (one per class, by label) let predictions name their classes; `extra`
    entries go to model.json."""
    class_names = [str(c) for c in class_names]
    if class_names and len(class_names) != arch.num_classes:
        raise ValueError(f"{len(class_names)} class names for {arch.num_classes} classes")
    if is_finished(directory):
        raise FileExistsError(
            f"{directory} already holds a finished export; choose another directory"
        )
    weights = paths.join(directory, WEIGHTS)
    if hosts.is_chief():
        paths.makedirs(directory)
        if paths.exists(weights):  # left by an interrupted export: never finished, redo it
            paths.rmtree(weights)
    hosts.barrier("export directory ready")
    checksums = trees.save_tree(weights, params)
    if not hosts.is_chief():
        hosts.barrier("export written")
        return
    manifest = {f"{WEIGHTS}/{rel}": digest for rel, digest in checksums.items()}
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
        **extra,
    }
    meta = json.loads(json.dumps(trees.standard(meta)))  # as it reads back
    meta[MANIFEST] = {MODEL_JSON: fields_digest(meta), **manifest}
    trees.write_json(paths.join(directory, MODEL_JSON), meta)
    hosts.barrier("export written")


def has_artifact(directory: str) -> bool:
    """Whether the export lists a `forward.jax` in its manifest (exports before manifests:
    whether the file is there)."""
    meta = trees.read_json(paths.join(directory, MODEL_JSON))
    if meta.get("format") == 1:
        return artifact_lib.exists(directory)
    return artifact_lib.FILE in meta.get(MANIFEST, {})


def add_artifact(directory: str) -> None:
    """Writes the finished export's `forward.jax` (deployable with jax alone) and lists it in
    the manifest (model.json is rewritten atomically; its fields stay as they were)."""
    meta = read_meta(directory)
    _, variables = load_pruned(directory)
    digest = artifact_lib.write(directory, meta["arch"], variables["params"])
    if meta["format"] == 1:
        return
    raw = trees.read_json(paths.join(directory, MODEL_JSON))
    raw[MANIFEST] = {**raw[MANIFEST], artifact_lib.FILE: digest}
    trees.write_json(paths.join(directory, MODEL_JSON), raw)


def read_meta(directory: str, allow_unverified: bool = False) -> dict:
    """`model.json` of a finished export, its fields checked against its manifest, with its
    architecture parsed; one-line errors. An export without a manifest (format 1, from
    before manifests) cannot be checked and is refused unless `allow_unverified`."""
    path = paths.join(directory, MODEL_JSON)
    if not paths.exists(path):
        raise FileNotFoundError(f"{directory} holds no finished export (no {MODEL_JSON})")
    try:
        meta = trees.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (1, FORMAT):
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: unsupported export format {got!r}")
    if meta["format"] == 1 and not allow_unverified:
        raise ExportError(
            f"{path} has no manifest (export format 1): its files cannot be checked; export "
            "again, or pass allow_unverified (--allow_unverified) if you trust them"
        )
    if meta["format"] >= 2:
        manifest = meta.get(MANIFEST)
        if not isinstance(manifest, dict) or manifest.get(MODEL_JSON) != fields_digest(meta):
            raise ExportError(
                f"{path} was changed after export (its fields do not match its manifest); "
                "restore it or export again"
            )
    try:
        meta["arch"] = arch_from_dict(meta["arch"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: broken architecture ({e})") from None
    return meta


def _weights_checksums(meta: dict) -> dict | None:
    if meta["format"] == 1:
        return meta.get("weights_sha256")
    prefix = f"{WEIGHTS}/"
    return {k[len(prefix) :]: v for k, v in meta[MANIFEST].items() if k.startswith(prefix)}


def read_arch(directory: str) -> Arch:
    return read_meta(directory)["arch"]


def load_pruned(directory: str, allow_unverified: bool = False) -> tuple:
    """(model, variables) such that `model.apply(variables, images)` gives logits.

    The weights must be the ones `model.json` describes: same checksums, same shapes."""
    meta = read_meta(directory, allow_unverified)
    arch = meta["arch"]
    model = models.build(arch)
    target = jax.eval_shape(model.init, jax.random.key(0), models.dummy_input(arch))["params"]
    weights = paths.join(directory, WEIGHTS)
    trees.check_shapes(weights, target, f"{paths.join(directory, MODEL_JSON)}")
    params = trees.load_tree(weights, target, _weights_checksums(meta))
    return model, {"params": params}


def forward(directory: str, allow_unverified: bool = False):
    """The export's `images -> logits`: its `forward.jax` artifact when it has one (checked
    against the manifest), else the model `load_pruned` gives (with tokens really dropped,
    `models.tokens.dropping`, where it has pruning points), jitted with the CPU kernel set
    the export was measured fastest with (`model.json`'s `cpu_kernels`; the default set
    elsewhere)."""
    meta = read_meta(directory, allow_unverified)
    expected = meta.get(MANIFEST, {}).get(artifact_lib.FILE)
    if expected or (meta["format"] == 1 and artifact_lib.exists(directory)):
        fn = artifact_lib.load(directory, expected)
    else:
        model, variables = load_pruned(directory, allow_unverified)
        if model.arch.token_points:
            drop = tokens.dropping(model)
            fn = lambda images: drop(variables, images)[0]  # noqa: E731
        else:
            fn = functools.partial(model.apply, variables)
    name = meta.get("cpu_kernels", "default")
    return xla_cpu.jit(fn, name if name in xla_cpu.SETS else "default")


def kernels(directory: str) -> str:
    """`model.json`'s CPU kernel set; the default one for a set this version does not know."""
    name = read_meta(directory).get("cpu_kernels", "default")
    return name if name in xla_cpu.SETS else "default"
