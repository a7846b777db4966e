"""Top-1 over a whole split and inference throughput (one model, or several interleaved)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax import timing, xla_cpu
from amap_jax.models import tokens
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
    model,
    variables,
    arch,
    batch_size: int,
    *,
    seconds: float = 3.0,
    min_iters: int = 5,
    kernels: str = "default",
) -> float:
    """Images per second of the jitted forward pass on random inputs (compile excluded),
    compiled with CPU kernel set `kernels` (`xla_cpu`)."""
    fwd = xla_cpu.jit(model.apply, kernels)
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


@functools.lru_cache(maxsize=16)
def _keep_step(model, inputs: Input):
    def step(variables, batch):
        _, reports = model.apply(variables, inputs(batch["image"]), mutable=[tokens.REPORTS])
        keeps = reports[tokens.REPORTS]["token_gate"]["keep"]
        return jnp.stack([k.sum(-1) for k in keeps], -1) - model.arch.num_prefix

    return jax.jit(step)


def kept_tokens(model, variables, batches, inputs: Input, mesh) -> np.ndarray:
    """[images, points]: the patch tokens each real image keeps at each pruning point."""
    step = _keep_step(model, inputs)
    variables = parallel.replicate(variables, mesh)
    out = []
    for batch in batches:
        counts = np.asarray(jax.device_get(step(variables, parallel.shard_batch(batch, mesh))))
        real = np.asarray(batch.get("mask", np.ones(len(counts)))) > 0
        out.append(counts[real])
    return np.concatenate(out).astype(int)


def token_throughput(
    model, variables, images, batch_size: int, *, buckets=None, groups=None, seconds: float = 3.0
) -> float:
    """Images per second of inference that really drops tokens on real images (what is kept
    depends on the image), cycling through `images`: `models.tokens.dropping`, one compiled
    program (`buckets`, `groups`: None, the architecture's)."""
    forward = tokens.compiled(model, buckets, groups)
    n = len(images) // batch_size * batch_size
    batches = [images[i : i + batch_size] for i in range(0, n, batch_size)]
    jax.block_until_ready(forward(variables, batches[0]))  # timing excludes compilation
    times, k = [], 0
    t_end = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < t_end:
        batch = batches[k % len(batches)]
        t = time.perf_counter()
        jax.block_until_ready(forward(variables, batch))
        times.append(time.perf_counter() - t)
        k += 1
    return batch_size / float(np.median(times))


def paired_throughput(
    runs: dict, batch_size: int, *, seconds: float, rounds: int = 5
) -> dict[str, list[float]]:
    """Images/s per round of each `name: (model, variables, arch, kernels)` on one random batch,
    the models interleaved within every round (`timing.interleaved`): a ratio of two of them is
    taken within a round, so load that comes and goes between the two does not land in it.
    `seconds` is each model's total over the rounds."""
    fns = {}
    for name, (model, variables, arch, kernels) in runs.items():
        fwd = xla_cpu.jit(model.apply, kernels)
        x = jax.random.normal(
            jax.random.key(0),
            (batch_size, arch.image_size, arch.image_size, arch.in_chans),
            jnp.float32,
        )
        fns[name] = functools.partial(
            lambda f, v, x: jax.block_until_ready(f(v, x)), fwd, variables, x
        )
    return timing.interleaved(fns, seconds / rounds, rounds, batch_size)


def batch1_speeds(
    dense_model,
    dense_variables,
    model,
    variables,
    images,
    *,
    seconds: float,
    rounds: int = 3,
    compiler_options: dict | None = None,
) -> tuple[float, float]:
    """Images/s at batch 1 of a dense model and of a model that drops tokens
    (`models.tokens.dropping`), interleaved round by round (`timing.interleaved`) on the same
    images, one per call, already on the device; medians over the rounds. A latency ratio
    taken from two separate timings would fold in whatever else the machine did between.
    `compiler_options`: XLA's, for both programs."""
    dense = jax.jit(dense_model.apply, compiler_options=compiler_options or None)
    drop = (  # the cached program where the options are the default
        jax.jit(tokens.dropping(model), compiler_options=compiler_options)
        if compiler_options
        else tokens.compiled(model)
    )
    singles = [images[i : i + 1] for i in range(min(len(images), 64))]
    speeds = timing.interleaved(
        {
            "dense": timing.cycling(lambda x: dense(dense_variables, x), singles),
            "pruned": timing.cycling(lambda x: drop(variables, x), singles),
        },
        seconds / rounds,
        rounds,
        batch=1,
    )
    return float(np.median(speeds["dense"])), float(np.median(speeds["pruned"]))
