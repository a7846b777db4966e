"""The stage loop: resume, step, log, checkpoint; nothing lost on interruption."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from amap_jax.logs import log as logging
from amap_jax.train import parallel
from amap_jax.train.checkpoint import Checkpointer
from amap_jax.train.scalars import Scalars


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


class Diverged(RuntimeError):
    """A non-finite loss or gradient: the stage stops, its last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM (a preempted TPU VM, a SLURM job at its time limit): checkpoint saved."""

    exit_code = 75  # EX_TEMPFAIL: a job script may requeue


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: checkpoint saved."""

    exit_code = 130


FAULT_ENV = "AMAP_FAULT"  # tests: "SIGKILL@search:3" sends that signal after step 3 of search


def _fault(name: str) -> tuple[int, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    sig, _, where = spec.partition("@")
    stage, _, step = where.partition(":")
    return (getattr(signal, sig), int(step)) if stage == name else None


class _SigTerm:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _save_now(ckpt: Checkpointer, state, start: int) -> int:
    """Saves the current state (once) and waits for it, deaf to further Ctrl-C meanwhile."""
    step = int(state.step)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        if step > start and ckpt.latest_step() != step:
            ckpt.save(step, state)
        ckpt.wait()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
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
    Ctrl-C (`Interrupted`) and SIGTERM (`Preempted`) save a checkpoint first; a non-finite
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
    fault = _fault(name)
    it = batches(start)
    sums: dict[str, float] = {}
    window: dict[str, float] = {}  # since the last scalars write
    count = wcount = 0
    step = start
    try:
        with _SigTerm() as term:
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
                    epoch = int(np.ceil(step / steps_per_epoch))
                    if is_chief:
                        logging.info("%s epoch %d step %d: %s", name, epoch, step, _fmt(line))
                    sums, count = {}, 0
                if step % checkpoint_every == 0 or step == num_steps:
                    ckpt.save(step, place.host(state))
                if fault is not None and fault[1] == step:
                    os.kill(os.getpid(), fault[0])
                if parallel.any_process(term.received):  # every process stops at this step
                    saved = _save_now(ckpt, place.host(state), start)
                    raise Preempted(f"{name} preempted (SIGTERM) at step {saved}; checkpoint saved")
    except KeyboardInterrupt:
        saved = _save_now(ckpt, place.host(state), start)
        logging.warning("%s interrupted at step %d; checkpoint saved", name, saved)
        raise Interrupted(f"{name} interrupted at step {saved}; checkpoint saved") from None
    finally:
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
    return " ".join(f"{k}={v:.4f}" for k, v in d.items())
