"""Shared pieces of the benchmarks: a pruned model at a MACs target, timing, result files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import flags

from amap_jax import cli, logs, models
from amap_jax.io.pretrained import NAMES, named_arch
from amap_jax.methods import amap, similarity
from amap_jax.methods.amap import INDICATORS, SIMILARITY, Amap
from amap_jax.models.arch import vit_arch

# Every bench imports this module: its command line shows its own lines and the libraries'
# warnings, not their INFO chatter (the TPU-backend line, orbax's checkpoint steps).
logs.quiet_libraries()

RESULTS = os.path.join(os.path.dirname(__file__), "results")  # the results the docs cite
_TAG = flags.DEFINE_string("tag", "", "Suffix of the results file names.")
_OUT = flags.DEFINE_string(
    "results_dir", "workdirs/bench", "Where a bench writes its results (unless --update_results)."
)
_UPDATE = flags.DEFINE_bool(
    "update_results", False, "Write into bench/results/, the results the README and docs cite."
)
# Flags several benchmarks take; each bench sets its own defaults with `defaults`.
BATCH = flags.DEFINE_integer("batch", 32, "Batch size.", lower_bound=1)
ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.", lower_bound=1)
SECONDS = flags.DEFINE_float(
    "seconds", 4.0, "Seconds per model per round.", lower_bound=0.0, upper_bound=3600.0
)
MODELS = flags.DEFINE_list(
    "models",
    ["Ti"],
    "Published names (e.g. flatten_swin_tiny_patch4_224) or ViT variant[:pattern].",
)
TARGETS = flags.DEFINE_list("targets", ["0.7", "0.5"], "MACs targets.")


def check_list(flag, kind, test, what: str) -> None:
    """A comma-list flag of numbers checked when the flags are parsed: a bad item ends in one
    line naming the flag, before any work."""

    def ok(values) -> bool:
        try:
            xs = [kind(v) for v in values or ()]
        except ValueError:
            return False
        return all(math.isfinite(x) and test(x) for x in xs)

    flags.register_validator(flag.name, ok, message=f"--{flag.name} takes {what}")


check_list(TARGETS, float, lambda t: 0 < t <= 1, "shares in (0, 1]")
WORKDIR = flags.DEFINE_string("workdir", None, "A finished run (benches that read one).")
KERNELS = flags.DEFINE_string(
    "kernels",
    "measure",
    "CPU kernel set of our models (amap_jax.xla_cpu.SETS), or 'measure': each model's fastest "
    "(amap_jax.export_speed.fastest_kernels, timed in float32), as cpu_kernels=measure does.",
)


def defaults(**values) -> None:
    """A bench's own defaults of the shared flags (e.g. batch=256); call before `app.run`."""
    for name, value in values.items():
        flags.FLAGS.set_default(name, value)


def suffix() -> str:
    """`_TAG` for --tag=TAG, so that a variant run does not overwrite the main results."""
    return f"_{_TAG.value}" if _TAG.value else ""


def parse_arch(spec: str):
    """A published name (e.g. flatten_swin_tiny_patch4_224) or a ViT 'variant[:pattern]'."""
    if spec in NAMES:
        return named_arch(spec)
    variant, _, pattern = spec.partition(":")
    return vit_arch(variant, pattern=pattern or None)


def dense_and_pruned(arch, target: float, *, seed: int = 0, method: Amap | None = None):
    """A dense model and its AMAP export at `target` MACs, with random weights and indicators.

    Widths come from AMAP's finalize, so they are what a search would produce for that target
    (which channels are kept does not change the speed).
    """
    params = models.build(arch).init(jax.random.key(seed), models.dummy_input(arch))["params"]
    rng = np.random.default_rng(seed)
    ind = jax.tree.map(
        lambda x: x + rng.normal(size=x.shape).astype(np.float32),
        amap.constant_indicators(arch, 2.0),
    )
    method = dataclasses.replace(method or Amap(), target=target)
    variables = {
        "params": params,
        INDICATORS: ind,
        SIMILARITY: similarity.similarity_weights(arch, params),
    }
    p_arch, p_params = method.export(arch, method.finalize(arch, variables))
    return arch, params, p_arch, p_params


def at_widths(arch, head: int, hidden: int):
    """`arch` with every block at `head` q/k/v channels per head and `hidden` MLP units (the
    dense softmax scale kept, as export keeps it)."""
    blocks = tuple(
        dataclasses.replace(b, qk_dim=head, v_dim=head, mlp_dim=hidden, qk_scale=b.scale)
        for b in arch.blocks
    )
    return arch.replace(blocks=blocks)


def kernel_set(arch, params, batch: int, kernels: str) -> str:
    """The CPU kernel set a `--kernels` value gives this model ("measure": its fastest)."""
    from amap_jax import export_speed, xla_cpu

    if kernels == "measure":
        return export_speed.fastest_kernels(arch, params, batch)[0]
    xla_cpu.check(kernels)
    return kernels


def time_fn(fn, *args, seconds: float = 3.0, min_iters: int = 5) -> float:
    """Median seconds per call after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    end = time.perf_counter() + seconds
    while len(times) < min_iters or time.perf_counter() < end:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def cpus() -> int:
    """The CPUs this process may run on (fewer than the machine's under `taskset`)."""
    return len(os.sched_getaffinity(0))


def run(main) -> None:
    """`app.run` for a bench: a bad flag or setting ends in one line naming it (exit 2), before
    any work where the bench checks it first; output piped into `head` ends quietly."""
    from absl import app

    def guarded(argv):
        try:
            return main(argv)
        except (app.UsageError, ValueError, FileNotFoundError) as e:
            print(
                f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr
            )
            sys.exit(2)
        except BrokenPipeError:
            cli.reader_gone()

    app.run(guarded, flags_parser=cli.parse_flags)


def git(*args) -> str:
    """`git ARGS` in the checkout: its output (CalledProcessError / OSError where it fails)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def commit() -> str:
    """The checkout's commit ("+" when it has uncommitted changes), or "" outside git."""
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+" if dirty else "")


def out_dir() -> str:
    """Where this bench writes: --results_dir (default workdirs/bench), or bench/results/ with
    --update_results (a run that is to replace what the docs cite says so). Outside a command
    line (tests, imports) bench/results/ as `RESULTS` says."""
    if not flags.FLAGS.is_parsed() or _UPDATE.value:
        return RESULTS
    os.makedirs(_OUT.value, exist_ok=True)
    return _OUT.value


def write(name: str, rows: list[dict], meta: dict, markdown: str | None = None) -> str:
    """OUT/NAME.json (rows, meta and where they were measured; `out_dir`), and NAME.md beside
    it when a `markdown` report is given; returns the JSON's path."""
    results = out_dir()
    os.makedirs(results, exist_ok=True)
    path = os.path.join(results, f"{name}.json")
    info = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "cpus": cpus(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # e.g. another CPU kernel library
        "commit": commit(),
        "argv": sys.argv[1:],
        "date": time.strftime("%Y-%m-%d"),
    }
    with open(path, "w") as f:
        json.dump({"meta": {**info, **meta}, "rows": rows}, f, indent=1)
    if markdown is not None:
        with open(os.path.join(results, f"{name}.md"), "w") as f:
            f.write(markdown)
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    cells = [[str(c) for c in cols]] + [[_fmt(r[c]) for c in cols] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(wi) for c, wi in zip(r, w, strict=True)) for r in cells)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def token_run(workdir: str):
    """(config, context, dense arch, exported model, its variables) of a finished token-pruning
    run; one-line exits for a run without an export or whose export drops no tokens."""
    from amap_jax import pipeline
    from amap_jax import workdir as workdir_lib
    from amap_jax.io import pruned
    from amap_jax.train import checkpoint

    config = ml_collections.ConfigDict(checkpoint.read_json(os.path.join(workdir, "config.json")))
    ctx, arch = pipeline.make_context(config, workdir)
    export = workdir_lib.export_location(workdir)
    if export is None or not pruned.is_finished(export):
        raise SystemExit(f"error: {workdir} has no finished export")
    model, variables = pruned.load_pruned(export)
    if not model.arch.token_points:
        raise SystemExit(f"error: the export of {workdir} does not drop tokens")
    return config, ctx, arch, model, variables
