"""Timing several functions fairly: each round runs every one, so that all see the same machine
(a busy neighbour, a turbo clock) and ratios are taken within a round."""

from __future__ import annotations

import itertools
import time

import numpy as np


def interleaved(fns: dict, seconds: float, rounds: int, batch: int) -> dict[str, list[float]]:
    """Images/s of every `fn()` (which must block until done) per round, the models
    interleaved within each round so that they all see the same machine."""
    for fn in fns.values():
        fn()  # compile / warm up
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times, end = [], time.perf_counter() + seconds
            while len(times) < 2 or time.perf_counter() < end:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[name].append(batch / float(np.median(times)))
    return out


def cycling(fn, inputs: list):
    """A no-argument call for `interleaved`: runs `fn` on the next of `inputs` (in turn, so the
    work varies as it would) and waits for it."""
    import jax

    calls = itertools.count()
    return lambda: jax.block_until_ready(fn(inputs[next(calls) % len(inputs)]))
