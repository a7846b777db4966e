"""The stage loop: resume, step, log, checkpoint; nothing lost on interruption."""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from amap_jax import logs
from amap_jax.logs import log as logging
from amap_jax.train import parallel, stop
from amap_jax.train.checkpoint import Checkpointer
from amap_jax.train.scalars import Scalars


@dataclasses.dataclass
class Hook:
    """`fn(state) -> state` run after every `every`-th step (e.g. refresh similarity weights)."""

    every: int
    fn: Callable


class Progress:
    """One-line progress bar on a terminal (as wide as the terminal at most); periodic log
    lines elsewhere."""

    def __init__(self, name: str, total: int, start: int, enabled: bool):
        self.name, self.total, self.start = name, total, start
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.time()
        self.last = 0.0
        self.first: tuple[int, float] | None = None  # the first step seen: compiled by then

    def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        now = time.time()
        if now - self.last < 0.5 and step < self.total:
            return
        self.last = now
        if self.first is None:
            self.first = (step, now)
        done = (step - self.start) / max(self.total - self.start, 1)
        # Rate and ETA from the first step seen on: the steps before it paid for compilation.
        first_step, first_time = self.first
        rate = (step - first_step) / max(now - first_time, 1e-9)
        eta = f"eta {(self.total - step) / rate:.0f}s" if rate > 0 else "eta ..."
        tail = " ".join(f"{k}={v:.3f}" for k, v in (metrics or {}).items())
        text = f"{step}/{self.total} {rate:.1f} it/s {eta} {tail}"
        # The bar takes what the terminal leaves beside the name and the numbers (10 to 30).
        room = min(max(logs.width() - len(self.name) - len(text) - 5, 10), 30)
        bar = "#" * int(room * done) + "." * (room - int(room * done))
        logs.draw_bar(f"{self.name} [{bar}] {text}")
        if step >= self.total:
            logs.end_bar()


class Diverged(RuntimeError):
    """A non-finite loss or gradient: the stage stops, its last good checkpoint is kept."""


def _save_now(ckpt: Checkpointer, state, start: int) -> int:
    """Saves the current state (once) and waits for it."""
    step = int(state.step)
    if step > start and ckpt.latest_step() != step:
        ckpt.save(step, state)
    ckpt.wait()
    return step


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
    placement: parallel.Placement | None = None,
    scalars_dir: str | None = None,
    scalars_every: int = 50,
    lr_fn: Callable[[int], float] | None = None,
):
    """Runs `step_fn` from the last checkpoint in `directory` to `num_steps`; returns the state.

    `batches(start_step)` yields this process's slice of each global batch from that step on.
    Ctrl-C (`stop.Interrupted`) and SIGTERM (`stop.Preempted`), seen by any process, stop
    every process after the same step with a checkpoint; a non-finite
    loss or gradient (`Diverged`) saves nothing, so the last checkpoint is the last good state.
    With `scalars_dir`, the chief writes the metrics' running means every `scalars_every`
    steps (with the learning rate `lr_fn(step)`) and what `on_epoch` reports (`Scalars`).
    """
    ckpt = Checkpointer(directory)
    place = placement or parallel.Placement(mesh)
    restored = ckpt.restore(state, parallel.replicated(mesh))
    if restored is not None:
        state = restored
    start = int(state.step)
    if start >= num_steps:
        ckpt.close()
        return parallel.replicate(state, mesh)
    state = place.state(state)
    step_args = place.state(step_args)  # e.g. a teacher: placed once, not per step
    if start:
        logging.info("%s: resuming at step %d/%d", name, start, num_steps)
    progress = Progress(name, num_steps, start, is_chief)
    scalars = Scalars(scalars_dir, name, start, enabled=is_chief)
    it = batches(start)
    sums: dict[str, float] = {}
    window: dict[str, float] = {}  # since the last scalars write
    count = wcount = 0
    step = start
    try:
        with stop.loop():
            for step in range(start + 1, num_steps + 1):
                state, metrics = step_fn(state, place.batch(next(it)), *step_args)
                for h in hooks:
                    if step % h.every == 0:
                        state = place.state(h.fn(place.host(state)))
                metrics = place.metrics(metrics)
                _check_finite(name, step, metrics, ckpt)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                    window[k] = window.get(k, 0.0) + float(v)
                count += 1
                wcount += 1
                progress.update(step, {k: v / count for k, v in sums.items() if k in _SHOWN})
                epoch_end = step % steps_per_epoch == 0 or step == num_steps
                if step % scalars_every == 0 or epoch_end:
                    means = {k: v / wcount for k, v in window.items()}
                    if lr_fn is not None:
                        means["lr"] = float(lr_fn(step - 1))  # the rate this step used
                    scalars.write(step, means, step / steps_per_epoch)
                    window, wcount = {}, 0
                if epoch_end:
                    line = {k: v / count for k, v in sums.items()}
                    if on_epoch is not None:
                        reported = on_epoch(step, place.host(state))
                        scalars.write(step, reported, step / steps_per_epoch)
                        line.update(reported)
                    epoch = f"{round(step / steps_per_epoch, 2):g}"  # 0.5 for half an epoch
                    if is_chief:
                        logging.info("%s epoch %s step %d: %s", name, epoch, step, _fmt(line))
                    sums, count = {}, 0
                if step % checkpoint_every == 0 or step == num_steps:
                    ckpt.save(step, place.host(state))
                stop.inject(name, step)
                if parallel.any_process(stop.requested() is not None):
                    saved = _save_now(ckpt, place.host(state), start)
                    # Another process's signal is a preemption here too.
                    e = stop.error(name, stop.requested() or signal.SIGTERM)
                    raise type(e)(f"{e} at step {saved}; checkpoint saved")
    except KeyboardInterrupt as e:  # raised by someone else's handler: save all the same
        if isinstance(e, stop.Interrupted):
            raise
        saved = _save_now(ckpt, place.host(state), start)
        raise stop.Interrupted(f"{name} interrupted at step {saved}; checkpoint saved") from None
    finally:
        logs.end_bar()
        scalars.close()
        if hasattr(it, "close"):  # stop the prefetch thread
            it.close()
    ckpt.wait()
    ckpt.close()
    return place.host(state)


def _check_finite(name: str, step: int, metrics: dict, ckpt: Checkpointer) -> None:
    loss, grad = float(metrics["loss"]), float(metrics.get("grad_norm", 0.0))
    if np.isfinite(loss) and np.isfinite(grad):
        return
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f"step {last}" if last is not None else "none"
    raise Diverged(
        f"{name} diverged at step {step} (loss {loss:.4g}, gradient norm {grad:.4g}); "
        f"last good checkpoint kept: {kept}; nothing exported; lower {name}.lr"
    )


_SHOWN = ("loss", "accuracy", "macs_ratio")


def _fmt(d: dict[str, float]) -> str:
    """Top-1 in % with 2 decimals, as the summary prints it; the rest with 4."""
    return " ".join(f"{k}={v:.2f}" if k.endswith("top1") else f"{k}={v:.4f}" for k, v in d.items())
