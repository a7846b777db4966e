"""Orbax checkpointing: the one module that reads and writes training state."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be restored (corrupt, or another model's)."""


class Checkpointer:
    """Saves a pytree every few steps and restores the latest one into a given target."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(tree))

    def restore(self, target):
        """Latest checkpoint shaped like `target`, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types; one clear message for all
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"cannot restore checkpoint step {step} in {self.directory}: {msg} "
                "(corrupt, or written by a different model/config; move it away to start over)"
            ) from None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def save_tree(directory: str, tree) -> None:
    """Writes a finished pytree (e.g. exported params) once, synchronously."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(directory), jax.tree.map(np.asarray, tree))


def load_tree(directory: str, target):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckpt:
        try:
            return ckpt.restore(os.path.abspath(directory), abstract)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"cannot read weights in {directory}: {msg}") from None


def write_json(path: str, obj) -> None:
    """Atomic JSON write: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
