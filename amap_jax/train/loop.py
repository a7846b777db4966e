"""The stage loop: resume, step, log, checkpoint; nothing lost on interruption."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from amap_jax.logs import log as logging
from amap_jax.train import parallel
from amap_jax.train.checkpoint import Checkpointer


@dataclasses.dataclass
class Hook:
    """`fn(state) -> state` run after every `every`-th step (e.g. refresh similarity weights)."""

    every: int
    fn: Callable


class Progress:
    """One-line progress bar on a terminal; periodic log lines elsewhere."""

    def __init__(self, name: str, total: int, start: int, enabled: bool):
        self.name, self.total, self.start = name, total, start
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.last = 0.0

    def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
        if not self.enabled or not self.tty:
            return
        now = time.time()
        if now - self.last < 0.5 and step < self.total:
            return
        self.last = now
        done = (step - self.start) / max(self.total - self.start, 1)
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        tail = " ".join(f"{k}={v:.3f}" for k, v in (metrics or {}).items())
        sys.stderr.write(
            f"\r{self.name} [{bar}] {step}/{self.total} {rate:.1f} it/s eta {eta:.0f}s {tail}"
        )
        if step >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def fit(
    *,
    name: str,
    directory: str,
    state,
    step_fn: Callable,
    batches: Callable[[int], Iterator[dict]],
    num_steps: int,
    steps_per_epoch: int,
    mesh,
    checkpoint_every: int = 500,
    hooks: tuple[Hook, ...] = (),
    on_epoch: Callable[[int, object], dict] | None = None,
    step_args: tuple = (),
    is_chief: bool = True,
):
    """Runs `step_fn` from the last checkpoint in `directory` to `num_steps`; returns the state.

    `batches(start_step)` yields this process's slice of each global batch from that step on.
    """
    ckpt = Checkpointer(directory)
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored
    state = parallel.replicate(state, mesh)
    start = int(state.step)
    if start >= num_steps:
        ckpt.close()
        return state
    if start:
        logging.info("%s: resuming at step %d/%d", name, start, num_steps)
    progress = Progress(name, num_steps, start, is_chief)
    it = batches(start)
    sums: dict[str, float] = {}
    count = 0
    step = start
    try:
        for step in range(start + 1, num_steps + 1):
            batch = parallel.shard_batch(next(it), mesh)
            state, metrics = step_fn(state, batch, *step_args)
            for h in hooks:
                if step % h.every == 0:
                    state = h.fn(state)
            metrics = jax.device_get(metrics)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
            progress.update(step, {k: v / count for k, v in sums.items() if k in _SHOWN})
            if step % steps_per_epoch == 0 or step == num_steps:
                line = {k: v / count for k, v in sums.items()}
                if on_epoch is not None:
                    line.update(on_epoch(step, state))
                epoch = int(np.ceil(step / steps_per_epoch))
                if is_chief:
                    logging.info("%s epoch %d step %d: %s", name, epoch, step, _fmt(line))
                sums, count = {}, 0
            if step % checkpoint_every == 0 or step == num_steps:
                ckpt.save(step, state)
    except KeyboardInterrupt:
        if int(state.step) > start and ckpt.latest_step() != int(state.step):
            ckpt.save(int(state.step), state)
        ckpt.wait()
        logging.warning("%s interrupted at step %d; checkpoint saved", name, int(state.step))
        raise
    finally:
        if hasattr(it, "close"):  # stop the prefetch thread
            it.close()
    ckpt.wait()
    ckpt.close()
    return state


_SHOWN = ("loss", "accuracy", "macs_ratio")


def _fmt(d: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in d.items())
