"""Scalars of a run, to watch and to plot: TensorBoard event files and a JSON-lines copy.

WORKDIR/tensorboard/ holds the event files (tag `stage/name`, x = the stage's step);
WORKDIR/scalars.jsonl holds one `{"stage", "step", "epoch", name: value, ...}` line per write,
for plotting without TensorBoard. Only the chief writes. A resumed stage first drops the
JSON lines it had written past its checkpoint, so the copy holds each step once.

On an object store (gs://, s3://), which cannot append, the JSON lines are rewritten whole at
most every 30 s and when the stage ends; TensorBoard writes there through tensorboardX's own
clients (gs:// needs google-cloud-storage; without it a warning, and the JSON lines only).
"""

from __future__ import annotations

import importlib.util
import json
import time

from tensorboardX import SummaryWriter

from amap_jax.io import paths
from amap_jax.logs import log as logging

JSONL = "scalars.jsonl"
EVENTS = "tensorboard"


class Scalars:
    def __init__(self, workdir: str | None, stage: str, resume_step: int, enabled: bool = True):
        self.stage = stage
        self.enabled = bool(enabled and workdir)
        self._tb = None
        if not self.enabled:
            return
        self.path = paths.join(workdir, JSONL)
        self.local = paths.is_local(workdir)
        self._lines = _kept_lines(self.path, stage, resume_step)
        self._flushed = 0.0
        self._flush(force=True)
        if str(workdir).startswith("gs://") and not _has("google.cloud.storage"):
            logging.warning("no TensorBoard event files in %s: needs google-cloud-storage", workdir)
            return
        # One file per stage and start (event file names only go down to the second).
        suffix = f".{stage}.{time.time_ns()}"
        self._tb = SummaryWriter(paths.join(workdir, EVENTS), flush_secs=30, filename_suffix=suffix)

    def write(self, step: int, values: dict[str, float], epoch: float | None = None) -> None:
        if not self.enabled or not values:
            return
        line = {"stage": self.stage, "step": int(step)}
        if epoch is not None:
            line["epoch"] = round(float(epoch), 4)
        line.update({k: float(v) for k, v in values.items()})
        if self.local:
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        else:
            self._lines.append(json.dumps(line) + "\n")
            self._flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{self.stage}/{k}", float(v), int(step))

    def _flush(self, force: bool = False) -> None:
        """Rewrites the whole file: at the start (the dropped lines), and on an object store."""
        if self._lines is None or not (force or time.time() - self._flushed > 30):
            return
        paths.write_atomic(self.path, "".join(self._lines))
        self._flushed = time.time()
        if self.local:
            self._lines = None  # appended to from now on

    def close(self) -> None:
        if self.enabled and not self.local:
            self._flush(force=True)
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _kept_lines(path: str, stage: str, step: int) -> list[str]:
    if not paths.exists(path):
        return []
    lines = paths.read_text(path).splitlines(keepends=True)
    return [line for line in lines if line.strip() and not _later(json.loads(line), stage, step)]


def _later(record: dict, stage: str, step: int) -> bool:
    return record.get("stage") == stage and record.get("step", 0) > step


def read(workdir: str) -> list[dict]:
    """The JSON-lines copy as a list of records."""
    path = paths.join(workdir, JSONL)
    if not paths.exists(path):
        return []
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]
