"""Cost of searching: AMAP search-step time vs dense train-step time on the same model.

  python -m bench.studies.search_step [--models Ti,Ti:LLLLLLSSSSSS,swin_tiny_patch4_window7_224,...]
      [--batch 32]

The search step adds the indicator collection, the head-balanced projection (sort per head) and
the masks; the ideal ratio is 1.0. The two steps are timed in alternation, `rounds` rounds of
`seconds` each, so that both see the same machine; the ratio is the median of the rounds'
ratios, with their range. Writes bench/results/search_step_<backend>.json.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amap_jax import models
from amap_jax.methods import amap, similarity
from amap_jax.methods.amap import INDICATORS, SIMILARITY, Amap
from amap_jax.models import dummy_input
from amap_jax.timing import interleaved
from amap_jax.train import steps
from bench import common


def _run(step, state, batch):
    """One step, its loss waited for; the new state is dropped (timing must not keep every new
    state alive)."""
    jax.block_until_ready(step(state, batch)[1]["loss"])


def main(_):
    rows = []
    for spec in common.MODELS.value:
        arch = common.parse_arch(spec)
        params = models.build(arch).init(jax.random.key(0), dummy_input(arch))["params"]
        inputs = steps.Input(arch.mean, arch.std, arch.image_size)
        batch = {
            "image": jnp.zeros(
                (common.BATCH.value, arch.image_size, arch.image_size, 3), jnp.uint8
            ),
            "label": jnp.zeros((common.BATCH.value,), jnp.int32),
        }
        objective = steps.Objective(arch.num_classes, 0.1)
        tx = steps.per_collection({"params": optax.adamw(1e-4)})
        dense = steps.create_state({"params": params}, tx)
        dense_step = jax.jit(steps.make_train_step(models.build(arch), tx, inputs, objective, 0))

        s_arch, s_params = arch, amap.add_reweight(arch, params)
        s_tx = steps.per_collection({"params": optax.adamw(1e-4), INDICATORS: optax.adam(0.05)})
        search = steps.create_state(
            {"params": s_params, INDICATORS: amap.constant_indicators(s_arch, 3.0)},
            s_tx,
            {SIMILARITY: similarity.similarity_weights(s_arch, s_params)},
        )
        s_obj = steps.Objective(
            arch.num_classes, 0.1, regularizer=amap.macs_regularizer(s_arch, 0.7, 10.0)
        )
        search_step = jax.jit(
            steps.make_train_step(models.build(s_arch, sites=Amap()), s_tx, inputs, s_obj, 0)
        )
        fns = {
            "dense": functools.partial(_run, dense_step, dense, batch),
            "search": functools.partial(_run, search_step, search, batch),
        }
        ips = interleaved(fns, common.SECONDS.value, common.ROUNDS.value, common.BATCH.value)
        ratios = [d / s for d, s in zip(ips["dense"], ips["search"], strict=True)]
        sim = jax.jit(functools.partial(similarity.similarity_weights, s_arch))
        t_sim = common.time_fn(sim, s_params, seconds=2.0)
        rows.append(
            {
                "model": arch.name,
                "dense_step_s": round(common.BATCH.value / float(np.median(ips["dense"])), 4),
                "search_step_s": round(common.BATCH.value / float(np.median(ips["search"])), 4),
                "ratio": round(float(np.median(ratios)), 3),
                "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                "ideal": 1.0,
                "similarity_refresh_s": round(t_sim, 4),
            }
        )
        print(common.table(rows[-1:], list(rows[-1])), flush=True)
    name = f"search_step_{jax.default_backend()}{common.suffix()}"
    meta = {
        "batch": common.BATCH.value,
        "rounds": common.ROUNDS.value,
        "seconds": common.SECONDS.value,
    }
    path = common.write(name, rows, meta)
    print(common.table(rows, list(rows[0])))
    print(f"wrote {path}")


if __name__ == "__main__":
    common.defaults(
        models=[
            "Ti",
            "Ti:LLLLLLSSSSSS",
            "swin_tiny_patch4_window7_224",
            "flatten_swin_tiny_patch4_224",
        ],
        batch=32,
        seconds=4.0,
    )
    common.run(main)
