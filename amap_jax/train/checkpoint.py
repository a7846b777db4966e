"""Orbax checkpointing: the one module that reads and writes training state.

Every committed checkpoint is sealed with the SHA-256 of its files. On restore a checkpoint whose
files no longer match (bit rot, a truncated copy) is moved aside to `<dir>.corrupt/` and the one
before it is used, with a warning: training is a pure function of (state, step), so resuming
from an older step reaches the same result.
"""

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
from amap_jax.logs import log as logging
from amap_jax.train import parallel

SEAL = "amap_sha256.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be restored (corrupt, or another model's)."""


def nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * np.size(x) for x in jax.tree.leaves(tree)))


@contextlib.contextmanager
def _disk_errors(path: str):
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


class Checkpointer:
    """Saves a pytree every few steps and restores the latest intact one into a given target."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = paths.absolute(directory)
        self._max_to_keep = max_to_keep
        self._unsealed: list[int] = []
        self._manager = self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep, create=True, cleanup_tmp_directories=True
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def _step_dir(self, step: int) -> str:
        return paths.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree) -> None:
        self._seal()
        paths.ensure_space(self._step_dir(step), nbytes(tree))
        with _disk_errors(self._step_dir(step)):
            self._manager.save(step, args=ocp.args.StandardSave(tree))
        self._unsealed.append(step)

    def _seal(self) -> None:
        """Checksums of the saves that have committed since the last seal."""
        if not self._unsealed:
            return
        with _disk_errors(self._step_dir(self._unsealed[-1])):
            self._manager.wait_until_finished()
        parallel.barrier("checkpoint committed")  # every process's files are written
        if parallel.is_chief():
            for step in self._unsealed:
                d = self._step_dir(step)
                if paths.isdir(d):
                    write_json(paths.join(d, SEAL), digest(d))
        self._unsealed.clear()

    def _problem(self, step: int) -> str | None:
        seal = paths.join(self._step_dir(step), SEAL)
        if not paths.exists(seal):
            return None  # committed but not sealed (stopped right after a save): try it
        try:
            expected = read_json(seal)
        except (OSError, ValueError):
            return "its checksum file is unreadable"
        return verify(self._step_dir(step), expected)

    def restore(self, target, sharding=None):
        """The latest intact checkpoint shaped like `target` (placed with `sharding`, e.g.
        replicated over every process's devices), or None when there is none.

        A corrupt latest checkpoint falls back to the one before it (moved aside, with a
        warning). A checkpoint that is intact but does not fit `target` (another model) is a
        `CheckpointError`.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        if sharding is not None:
            abstract = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract
            )
        failed: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            problem = self._problem(step)
            sealed = paths.exists(paths.join(self._step_dir(step), SEAL))
            if problem is None:
                try:
                    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
                except Exception as e:  # orbax raises many types; one clear message for all
                    problem = str(e).splitlines()[0] if str(e) else type(e).__name__
                    if sealed:  # intact files that do not fit: not bit rot, another model
                        raise CheckpointError(
                            f"cannot restore checkpoint step {step} in {self.directory}: "
                            f"{problem} (written by a different model/config; move it away to "
                            "start over)"
                        ) from None
                else:
                    self._set_aside(failed)
                    return restored
            failed.append((step, problem))
        if failed:
            step, problem = failed[0]
            raise CheckpointError(
                f"cannot restore checkpoint step {step} in {self.directory}: {problem} "
                "(corrupt, or written by a different model/config, and no earlier checkpoint "
                "restores; move it away to start over)"
            )
        return None

    def _set_aside(self, failed: list[tuple[int, str]]) -> None:
        """Moves corrupt checkpoints out of the way of new saves, keeping them for inspection."""
        if not failed:
            return
        parallel.barrier("restored")  # all processes found the same: the chief moves them
        if parallel.is_chief():
            self._move_aside(failed)
        parallel.barrier("set aside")
        self._manager.close()
        self._manager = self._open()

    def _move_aside(self, failed: list[tuple[int, str]]) -> None:
        aside = f"{self.directory}.corrupt"
        paths.makedirs(aside)
        for step, problem in failed:
            dest = paths.join(aside, str(step))
            if paths.exists(dest):
                paths.rmtree(dest)
            paths.move(self._step_dir(step), dest)
            logging.warning(
                "checkpoint step %d in %s is corrupt (%s): moved to %s; resuming from the one "
                "before it",
                step,
                self.directory,
                problem,
                dest,
            )

    def wait(self) -> None:
        with _disk_errors(self.directory):
            self._manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def save_tree(directory: str, tree) -> dict[str, str]:
    """Writes a finished pytree (e.g. exported params) once, synchronously; returns its
    checksums."""
    directory = paths.absolute(directory)
    tree = jax.tree.map(np.asarray, tree)
    paths.ensure_space(directory, nbytes(tree))
    with _disk_errors(directory), ocp.StandardCheckpointer() as ckpt:
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
