"""Scalars of a run, to watch and to plot: TensorBoard event files and a JSON-lines copy.

WORKDIR/tensorboard/ holds the event files (tag `stage/name`, x = the stage's step);
WORKDIR/scalars.jsonl holds one `{"stage", "step", "epoch", name: value, ...}` line per write,
for plotting without TensorBoard. Only the chief writes. A resumed stage first drops the
JSON lines it had written past its checkpoint, so the copy holds each step once.
"""

from __future__ import annotations

import json
import os
import time

from tensorboardX import SummaryWriter

JSONL = "scalars.jsonl"
EVENTS = "tensorboard"


class Scalars:
    def __init__(self, workdir: str | None, stage: str, resume_step: int, enabled: bool = True):
        self.stage = stage
        self.enabled = bool(enabled and workdir)
        self._tb = None
        if not self.enabled:
            return
        self.path = os.path.join(workdir, JSONL)
        _drop_after(self.path, stage, resume_step)
        # One file per stage and start (event file names only go down to the second).
        suffix = f".{stage}.{time.time_ns()}"
        self._tb = SummaryWriter(
            os.path.join(workdir, EVENTS), flush_secs=30, filename_suffix=suffix
        )

    def write(self, step: int, values: dict[str, float], epoch: float | None = None) -> None:
        if not self.enabled or not values:
            return
        line = {"stage": self.stage, "step": int(step)}
        if epoch is not None:
            line["epoch"] = round(float(epoch), 4)
        line.update({k: float(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{self.stage}/{k}", float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _drop_after(path: str, stage: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and not _later(json.loads(line), stage, step)]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _later(record: dict, stage: str, step: int) -> bool:
    return record.get("stage") == stage and record.get("step", 0) > step


def read(workdir: str) -> list[dict]:
    """The JSON-lines copy as a list of records."""
    path = os.path.join(workdir, JSONL)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
