"""The project's own log, separate from absl's (which libraries fill with their INFO lines)."""

import logging
import sys

log = logging.getLogger("amap_jax")


def setup(level: int = logging.INFO, chief: bool = True) -> None:
    """Progress lines from the chief only; warnings and errors from every process."""
    level = level if chief else max(level, logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
