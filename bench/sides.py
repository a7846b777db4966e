"""Benchmarks that time jax and torch side by side: their shared flags, timm's model names,
and the runner of one side's process.

Each framework runs in its own process (in one process XLA's and torch's thread pools compete),
jax and torch alternated `alternations` times.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from absl import flags

MODEL = flags.DEFINE_enum("model", "S", ["Ti", "S", "B"], "DeiT size (patch 16, 224 px).")
ALTERNATIONS = flags.DEFINE_integer("alternations", 2, "jax/torch process pairs.", lower_bound=1)
IMAGE = flags.DEFINE_integer(
    "image_size", 224, "Input size (smaller: quick checks).", lower_bound=8
)
WIDTHS = flags.DEFINE_list(
    "widths", ["45:1099", "33:794"], "Pruned models: head_dim:mlp_hidden in every block."
)
WORKER = flags.DEFINE_enum("worker", None, ["jax", "torch"], "Internal: run one side.")

TIMM = {"Ti": "deit_tiny_patch16_224", "S": "deit_small_patch16_224", "B": "deit_base_patch16_224"}


def run_worker(module: str, side: str, flag: str = "worker", extra=(), env=None) -> dict:
    """Runs `python -m module --{flag}=side [extra]` with this process's other flags (and
    `env`); its last stdout line is JSON."""
    own = (f"--{flag}", *(a.partition("=")[0] for a in extra))
    args = [a for a in sys.argv[1:] if not a.startswith(own)]
    cmd = [sys.executable, "-m", module, f"--{flag}={side}", *extra, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def serve(jax_worker, torch_worker) -> bool:
    """In a worker process (`--worker`): runs that side, prints its JSON line; True if so."""
    if WORKER.value:
        print(json.dumps(jax_worker() if WORKER.value == "jax" else torch_worker()))
    return bool(WORKER.value)


def alternate(module: str) -> dict[str, list[dict]]:
    """{"jax": [...], "torch": [...]}: each side's worker output, `alternations` times in turn."""
    runs = {"jax": [], "torch": []}
    for k in range(ALTERNATIONS.value):
        for side in runs:
            t = time.time()
            runs[side].append(run_worker(module, side))
            print(f"alternation {k + 1}/{ALTERNATIONS.value}: {side} {time.time() - t:.0f} s")
    return runs
