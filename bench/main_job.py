"""What the README's main job prints: its command, run as written, and the lines it printed, so
that the README quotes a run of this code instead of a block typed by hand.

  python -m bench.main_job [--workdir workdirs/fmnist_vit] [--update_results]

Runs `train.py --config configs/fmnist_amap_vit.py --workdir WORKDIR` (a finished work directory
reprints its summary; an interrupted one resumes) and writes main_job.{json,md}: the summary's
numbers and the printed table, with the machine's load while it ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import common

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/fmnist_amap_vit.py"  # the README's quick-start command
# The summary's lines: from the table's header to the busy-machine note, if any.
_FIRST = "params"


def printed_table(stdout: str) -> str:
    """The summary table and the lines under it, without the closing line (which names paths of
    this machine)."""
    lines = stdout.rstrip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [_FIRST])
    return "\n".join(line for line in lines[start:] if not line.startswith("summary: "))


def main(argv):
    del argv
    workdir = os.path.abspath(common.WORKDIR.value or os.path.join(common.out_dir(), "main_job"))
    load = os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT_DIR, "train.py"), "--config", CONFIG, "--workdir",
         workdir],
        cwd=ROOT_DIR, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"error: the main job ended with exit {done.returncode}")
    with open(os.path.join(workdir, "summary.json")) as f:
        s = json.load(f)
    table = printed_table(done.stdout)
    load = max(load, os.getloadavg()[0])
    busy = f"{load:.1f} load average on {common.cpus()} CPUs"
    md = f"```\n{table}\n```\n\n(`.venv/bin/python -m bench.main_job`; {busy} while it ran)\n"
    row = {
        "seed": s.get("seed", 0),
        "dense_params": s["dense"]["params"],
        "pruned_params": s["pruned"]["params"],
        "dense_top1": s["dense"]["top1"],
        "pruned_top1": s["pruned"]["top1"],
        "macs_ratio": s["macs_ratio"],
        "speedup": s["speedup"],
        "speedup_range": s.get("speedup_range"),
        "speed_busy": s.get("speed_busy"),
    }
    common.write("main_job", [row], {"config": CONFIG, "load": busy, "printed": table}, md)
    print(md)


if __name__ == "__main__":
    common.run(main)
