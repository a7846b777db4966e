"""Data parallelism over a 1-D `data` mesh: batch sharded, weights replicated.

The same jitted step runs on 1 device, N local devices or N hosts: only the mesh differs.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"asked for {n} devices, only {len(devices)} are visible")
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
