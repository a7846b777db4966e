"""The project's own log, separate from absl's (which libraries fill with their INFO lines)."""

import logging
import sys

log = logging.getLogger("amap_jax")


def setup(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
