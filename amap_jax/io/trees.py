"""Finished pytrees on disk (exported weights) and the JSON files beside them: written once,
sealed with the SHA-256 of their files, read back only if intact and of the expected shapes.
Training checkpoints (`train.checkpoint`) use the same seals and errors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from amap_jax.io import paths

SEAL = "amap_sha256.json"  # the checksums of a checkpoint's files, inside it


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be restored (corrupt, or another model's)."""


def nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * np.size(x) for x in jax.tree.leaves(tree)))


@contextlib.contextmanager
def disk_errors(path: str):
    """An orbax/tensorstore failure from a full disk as the OSError it is, naming `path`."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        text = str(e)
        for code in (errno.ENOSPC, errno.EDQUOT):
            if os.strerror(code) in text or f"os_error_code='{code}'" in text:
                raise OSError(code, os.strerror(code), path) from None
        raise


def digest(directory: str) -> dict[str, str]:
    """SHA-256 of every file under `directory` (but the seal), by relative path."""
    out = {}
    for rel in paths.files(directory):
        if rel == SEAL:
            continue
        h = hashlib.sha256()
        with epath.Path(paths.join(directory, rel)).open("rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
        out[rel] = h.hexdigest()
    return out


def verify(directory: str, expected: dict[str, str]) -> str | None:
    """None if the files under `directory` are the sealed ones, else what differs (one line)."""
    got = digest(directory)
    missing = sorted(set(expected) - set(got))
    if missing:
        return f"file {missing[0]} is missing"
    changed = sorted(k for k in expected if got[k] != expected[k])
    if changed:
        return f"file {changed[0]} does not match its checksum"
    return None


def save_tree(directory: str, tree) -> dict[str, str]:
    """Writes a finished pytree (e.g. exported params) once, synchronously; returns its
    checksums."""
    directory = paths.absolute(directory)
    tree = jax.tree.map(np.asarray, tree)
    paths.ensure_space(directory, nbytes(tree))
    with disk_errors(directory), ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory, tree)
    return digest(directory)


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def check_shapes(directory: str, target, described_by: str) -> None:
    """The arrays stored in `directory` must be exactly those of `target` (one-line error)."""
    try:
        with ocp.StandardCheckpointer() as ckpt:
            stored = ckpt.metadata(paths.absolute(directory)).item_metadata.tree
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read weights in {directory}: {msg}") from None
    have = {
        _path(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(
            stored, is_leaf=lambda x: hasattr(x, "shape")
        )
    }
    want = {_path(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(target)}
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            raise CheckpointError(
                f"weights in {directory} do not match {described_by}: {name} is "
                f"{have.get(name, 'missing')}, expected {want.get(name, 'nothing')}"
            )


def load_tree(directory: str, target, checksums: dict[str, str] | None = None):
    directory = paths.absolute(directory)
    if checksums is not None:
        problem = verify(directory, checksums)
        if problem:
            raise CheckpointError(f"weights in {directory} are corrupt: {problem}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckpt:
        try:
            return ckpt.restore(directory, abstract)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"cannot read weights in {directory}: {msg}") from None


def standard(obj):
    """JSON has no NaN or infinity: non-finite floats become null."""
    if isinstance(obj, dict):
        return {k: standard(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [standard(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, obj) -> None:
    """Atomic, standard JSON write: a reader never sees half a file, or a bare NaN."""
    paths.write_atomic(path, json.dumps(standard(obj), indent=1, allow_nan=False))


def read_json(path: str):
    return json.loads(paths.read_text(path))
