"""Orbax checkpointing: the one module that reads and writes training state.

Every committed checkpoint is sealed with the SHA-256 of its files. On restore a checkpoint whose
files no longer match (bit rot, a truncated copy) is moved aside to `<dir>.corrupt/` and the one
before it is used, with a warning: training is a pure function of (state, step), so resuming
from an older step reaches the same result.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from amap_jax.io import paths
from amap_jax.io.trees import (  # noqa: F401 (re-exported: what checkpoint users read)
    SEAL,
    CheckpointError,
    check_shapes,
    digest,
    disk_errors,
    load_tree,
    nbytes,
    read_json,
    save_tree,
    standard,
    verify,
    write_json,
)
from amap_jax.logs import log as logging
from amap_jax.train import parallel


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
        with disk_errors(self._step_dir(step)):
            self._manager.save(step, args=ocp.args.StandardSave(tree))
        self._unsealed.append(step)

    def _seal(self) -> None:
        """Checksums of the saves that have committed since the last seal."""
        if not self._unsealed:
            return
        with disk_errors(self._step_dir(self._unsealed[-1])):
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
        with disk_errors(self.directory):
            self._manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self.wait()
        self._manager.close()
