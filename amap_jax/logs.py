"""The project's own log, separate from absl's (which libraries fill with their INFO lines), and
the one-line progress bar that shares stderr with it: a log line first clears a drawn bar, and
the bar never grows wider than the terminal."""

import logging
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


def setup(level: int = logging.INFO, chief: bool = True) -> None:
    """Progress lines from the chief only; warnings and errors from every process."""
    level = level if chief else max(level, logging.WARNING)
    if not log.handlers:
        handler = _Handler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
