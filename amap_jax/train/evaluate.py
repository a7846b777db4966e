"""Top-1 over a whole split and inference throughput."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax.train import parallel
from amap_jax.train.steps import Input, make_eval_step


@functools.lru_cache(maxsize=16)
def _eval_step(model, inputs: Input):
    """One compiled eval step per (model, input) pair: evaluating every epoch compiles once."""
    return jax.jit(make_eval_step(model, inputs))


def evaluate(model, variables, batches, inputs: Input, mesh) -> dict[str, float]:
    """Accuracy and mean loss over one evaluation pass (`mask` marks the real examples)."""
    step = _eval_step(model, inputs)
    variables = parallel.replicate(variables, mesh)
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in batches:
        out = jax.device_get(step(variables, parallel.shard_batch(batch, mesh)))
        for k in totals:
            totals[k] += float(out[k])
    n = max(totals["count"], 1.0)
    return {
        "top1": 100.0 * totals["correct"] / n,
        "loss": totals["loss"] / n,
        "count": int(totals["count"]),
    }


def throughput(
    model, variables, arch, batch_size: int, *, seconds: float = 3.0, min_iters: int = 5
) -> float:
    """Images per second of the jitted forward pass on random inputs (compile excluded)."""
    fwd = jax.jit(model.apply)
    x = jax.random.normal(
        jax.random.key(0),
        (batch_size, arch.image_size, arch.image_size, arch.in_chans),
        jnp.float32,
    )
    jax.block_until_ready(fwd(variables, x))
    times = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_iters or time.perf_counter() < t_end:
        t = time.perf_counter()
        jax.block_until_ready(fwd(variables, x))
        times.append(time.perf_counter() - t)
    return batch_size / float(np.median(times))
