"""Data parallelism over a 1-D `data` mesh: batch sharded, weights replicated.

The same jitted step runs on 1 device, N local devices or N hosts: only the mesh differs. With
several processes (`initialize`), each reads its slice of every global batch, the chief (process
0) logs and writes JSON, and every process takes part in checkpoints and the export.
"""

from __future__ import annotations

import socket
import time

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from amap_jax.io.hosts import any_process, barrier, broadcast, is_chief  # noqa: F401 (re-export)

AXIS = "data"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int = 300,
) -> None:
    """JAX's multi-process runtime: from the arguments, or (all None) from the environment
    that JAX recognises (Cloud TPU pod slices, SLURM, Open MPI). Waits `timeout` seconds for
    the others. Bad arguments, or a coordinator that does not answer within `timeout`, are a
    one-line ValueError here: inside JAX they abort the process with a C++ stack trace."""
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}"
            )
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} must be in [0, {num_processes}) "
                f"(--num_processes={num_processes})"
            )
        if process_id != 0:  # process 0 starts the coordinator; the others must reach it
            _wait_for(host, int(port), timeout)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
    )


def _wait_for(host: str, port: int, timeout: float) -> None:
    """Returns once something accepts connections at host:port; a one-line error after
    `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except OSError:
            if time.monotonic() >= end:
                raise ValueError(
                    f"the coordinator {host}:{port} did not answer within {timeout:g} s "
                    "(--distributed_timeout): is process 0 running, and is the address right?"
                ) from None
            time.sleep(0.2)


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


def check_batch_size(global_batch: int, mesh, name: str = "batch size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"{name} {global_batch} is not divisible by the {n} devices")


class Placement:
    """How the stage loop places state and batches and compiles the step: `jit` (default: one
    global state, the batch sharded over the mesh) or `pmap` (a copy of the state per device,
    each device's slice of the batch along a leading axis). Both give the same numbers; the
    loop sees `host(state)`, one copy in the jit layout, for checkpoints, hooks and callbacks,
    so checkpoints of either mode restore in the other."""

    def __init__(self, mesh, mode: str = "jit"):
        if mode not in ("jit", "pmap"):
            raise ValueError(f"parallel must be 'jit' or 'pmap', not {mode!r}")
        if mode == "pmap" and jax.process_count() > 1:
            raise ValueError("parallel=pmap runs in one process; use parallel=jit on several")
        self.mesh, self.pmap = mesh, mode == "pmap"
        self.n = mesh.devices.size
        self.axis = AXIS if self.pmap else None  # the step's `axis_name`

    def compile(self, step_fn):
        if not self.pmap:
            return jax.jit(step_fn, donate_argnums=0)
        return jax.pmap(step_fn, AXIS, devices=list(self.mesh.devices.flat), donate_argnums=0)

    def _stacked(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(AXIS))

    def state(self, tree):
        """A host or jit-layout tree as the step takes it."""
        if not self.pmap:
            return replicate(tree, self.mesh)
        stack = lambda x: np.broadcast_to(np.asarray(x), (self.n, *np.shape(x)))  # noqa: E731
        return jax.device_put(jax.tree.map(stack, tree), self._stacked())

    def batch(self, batch: dict[str, np.ndarray]):
        if not self.pmap:
            return shard_batch(batch, self.mesh)
        split = {k: np.asarray(v).reshape(self.n, -1, *np.shape(v)[1:]) for k, v in batch.items()}
        return jax.device_put(split, self._stacked())

    def host(self, tree):
        """One copy of a step's state, in the jit layout."""
        if not self.pmap:
            return tree
        return replicate(jax.tree.map(lambda x: x[0], tree), self.mesh)

    def metrics(self, metrics) -> dict:
        """A step's metrics as host numbers (pmap: every device holds the same mean)."""
        metrics = jax.device_get(metrics)
        return jax.tree.map(lambda x: x[0], metrics) if self.pmap else metrics
