"""Which process writes, and where every process waits: the few collectives that writing files
from several processes needs (a finished export, checkpoints, JSON records). One process:
nothing to coordinate."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_chief() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here for the others (nothing to do with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast(tree):
    """Process 0's host values on every process: what each process computes on the host must
    be the same everywhere, and this makes it so whatever the float rounding."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def any_process(flag: bool) -> bool:
    """True on every process when it is true on any (e.g. SIGTERM seen by one of them)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
