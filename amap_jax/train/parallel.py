"""Data parallelism over a 1-D `data` mesh: batch sharded, weights replicated.

The same jitted step runs on 1 device, N local devices or N hosts: only the mesh differs. With
several processes (`initialize`), each reads its slice of every global batch, the chief (process
0) logs and writes JSON, and every process takes part in checkpoints and the export.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """JAX's multi-process runtime: from the arguments, or (all None) from the environment
    that JAX recognises (Cloud TPU pod slices, SLURM, Open MPI)."""
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


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


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"asked for {n} devices, only {len(devices)} are visible")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(
            f"num_devices={n} with {jax.process_count()} processes: every process must take "
            f"part, so use all {len(devices)} devices (num_devices=0)"
        )
    # Auto axes: XLA propagates shardings from the inputs (batch sharded, weights replicated).
    return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicate(tree, mesh):
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's slice of a global batch -> one global array per entry."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def check_batch_size(global_batch: int, mesh) -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"batch size {global_batch} is not divisible by the {n} devices")
