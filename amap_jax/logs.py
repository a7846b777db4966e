"""The project's own log, separate from absl's (which libraries fill with their INFO lines), and
the one-line progress bar that shares stderr with it: a log line first clears a drawn bar, and
the bar never grows wider than the terminal."""

import contextlib
import logging
import os
import shutil
import sys

log = logging.getLogger("amap_jax")

_bar = {"drawn": False}
_CLEAR = "\r\x1b[K"  # back to the line's start, erase to its end


def width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


def draw_bar(text: str) -> None:
    """Redraws the progress line in place, cut to the terminal's width."""
    sys.stderr.write(_CLEAR + text[: max(width() - 1, 10)])
    sys.stderr.flush()
    _bar["drawn"] = True


def end_bar() -> None:
    """Keeps the bar as drawn and moves to the next line."""
    if _bar["drawn"]:
        sys.stderr.write("\n")
        sys.stderr.flush()
        _bar["drawn"] = False


def _clear_bar() -> None:
    if _bar["drawn"]:
        sys.stderr.write(_CLEAR)
        _bar["drawn"] = False


class _Handler(logging.StreamHandler):
    """Clears the progress bar before a line; the bar comes back at its next update."""

    def emit(self, record):
        if self.stream is sys.stderr:
            _clear_bar()
        super().emit(record)


def quiet_libraries() -> None:
    """For the command-line tools: the libraries' INFO lines off (absl's, orbax's, JAX's "Unable
    to initialize backend 'tpu'", TensorFlow's C++ start-up lines); their warnings stay."""
    from absl import logging as absl_logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # read when TensorFlow loads
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("jax", "orbax", "absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def native_stderr_off():
    """Native libraries' stderr lines off for the block (TensorFlow's import prints oneDNN and
    absl start-up lines that no environment variable turns off); Python errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def setup(level: int = logging.INFO, chief: bool = True) -> None:
    """Progress lines from the chief only; warnings and errors from every process."""
    level = level if chief else max(level, logging.WARNING)
    if not log.handlers:
        handler = _Handler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
