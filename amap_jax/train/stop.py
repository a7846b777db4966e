"""Stopping a run on SIGTERM (preemption), Ctrl-C or SIGHUP (its terminal closed): the signal
only sets a flag, and the run checks it at safe points (after every training step, between
phases, between evaluation batches). An exception raised from a signal handler can land anywhere,
a garbage-collector callback included, where it is swallowed and the run goes on as if nothing
happened.

`install()` (the command line does it first) makes every phase honour the flag; a library user
who does not call it still gets it inside training loops (`loop()`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from amap_jax.train import parallel

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_state = {"signal": None, "installed": False, "phase": "run", "in_loop": False}

FAULT_ENV = "AMAP_FAULT"  # tests: "SIGKILL@search:3" after step 3 of search; "SIGTERM@export"


class Preempted(Exception):
    """SIGTERM (a preempted TPU VM, a SLURM job at its time limit): nothing lost."""

    exit_code = 75  # EX_TEMPFAIL: a job script may requeue


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: nothing lost."""

    exit_code = 130


class HungUp(Preempted):
    """SIGHUP: the terminal the run was started from closed. Saved like a preemption."""

    exit_code = 129  # 128 + SIGHUP, what a shell reports for a hung-up job


def _handle(signum, frame):
    if signum == signal.SIGHUP:
        # Writes to a hung-up terminal fail (EIO): the saving and the last line must not.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            if os.isatty(fd):
                os.dup2(devnull, fd)
        os.close(devnull)
    if _state["signal"] is None:  # later presses change nothing: the stop is under way
        _state["signal"] = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """SIGTERM, Ctrl-C and SIGHUP set the flag for the rest of the process (main thread only)."""
    if _main_thread():
        for sig in _SIGNALS:
            signal.signal(sig, _handle)
        _state["installed"] = True


@contextlib.contextmanager
def loop():
    """A training loop, which saves a checkpoint before it stops: `check` inside it (e.g. in an
    evaluation between epochs) leaves the stop to the loop. Installs the flag handlers for the
    block where `install` was not called."""
    previous = {}
    if not _state["installed"] and _main_thread():
        previous = {sig: signal.signal(sig, _handle) for sig in _SIGNALS}
    outer, _state["in_loop"] = _state["in_loop"], True
    try:
        yield
    finally:
        _state["in_loop"] = outer
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def requested() -> int | None:
    """The first stop signal received (SIGTERM, SIGINT or SIGHUP), or None."""
    return _state["signal"]


def reset() -> None:
    _state["signal"] = None


def error(what: str, signum: int | None = None) -> Exception:
    """The exception a stop raises: Preempted for SIGTERM, Interrupted for Ctrl-C, HungUp for
    SIGHUP."""
    signum = signum or requested()
    if signum == signal.SIGINT:
        return Interrupted(f"{what} interrupted")
    if signum == signal.SIGHUP:
        return HungUp(f"{what} hung up (SIGHUP: the terminal closed)")
    return Preempted(f"{what} preempted (SIGTERM)")


def check() -> None:
    """Raises the stop for the current phase if one was requested, on this process or any
    other (every process calls it at the same points, so that all stop together), outside
    training loops (which stop themselves, after a checkpoint)."""
    if _state["in_loop"]:
        return
    if parallel.any_process(requested() is not None):
        raise error(_state["phase"], requested() or signal.SIGTERM) from None


@contextlib.contextmanager
def phase(name: str):
    """Names the phase that a stop inside the block reports; checks on entry and exit."""
    previous, _state["phase"] = _state["phase"], name
    try:
        inject(name)
        check()
        yield
        check()
    finally:
        _state["phase"] = previous


def fault(name: str) -> tuple[int, int | None] | None:
    """(signal, step or None) of the fault a test injects into phase `name`."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    sig, _, where = spec.partition("@")
    stage, _, step = where.partition(":")
    return (getattr(signal, sig), int(step) if step else None) if stage == name else None


def inject(name: str, step: int | None = None) -> None:
    """Sends the test's fault signal to this process where `AMAP_FAULT` says."""
    f = fault(name)
    if f is not None and f[1] == step:
        os.kill(os.getpid(), f[0])
