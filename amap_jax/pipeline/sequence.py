"""A run: the stages in order, in one locked work directory."""

from __future__ import annotations

import contextlib

from amap_jax import workdir as workdir_lib
from amap_jax.io import artifact, paths, pruned
from amap_jax.models.arch import Arch
from amap_jax.pipeline import stages, summary, tuning
from amap_jax.pipeline.context import Context, make_context
from amap_jax.train import checkpoint, parallel, stop


def run(config, workdir: str) -> dict:
    """Runs (or resumes) every stage and returns the summary written to WORKDIR/summary.json.

    A stop request (SIGTERM, Ctrl-C; `train.stop`) ends the run at the next safe point, in any
    phase, with what was finished kept."""
    stop.reset()
    if not str(workdir or "").strip():  # e.g. --workdir "$UNSET": never the current directory
        raise ValueError("workdir is empty (an unset shell variable?): name a work directory")
    with stop.phase("setup"):
        ctx, arch = make_context(config, workdir)
        workdir = ctx.workdir
        export_dir = paths.absolute(config.export_dir or paths.join(workdir, "export"))
        for path in (workdir, export_dir):
            paths.check_scheme(path)
        workdir_lib.check(workdir, config)
        if config.export_artifact:
            artifact.check_available()
        _check_export_dir(ctx, export_dir)
        # Every check passed: only now is anything written.
        paths.makedirs(workdir)
    with _lock(ctx, export_dir):
        _check_export_dir(ctx, export_dir)  # again: another run may have finished it meanwhile
        return _run(ctx, arch, export_dir)


@contextlib.contextmanager
def _lock(ctx: Context, export_dir: str):
    """The work directory, and an export directory outside it, for this run alone (the chief
    holds the locks for every process): two runs with one export_dir would each take the
    other's export for their own."""
    with contextlib.ExitStack() as held:
        refused = ""
        if ctx.is_chief:
            try:
                held.enter_context(workdir_lib.lock(ctx.workdir))
                if paths.relpath(export_dir, ctx.workdir) == export_dir:  # not inside it
                    held.enter_context(
                        workdir_lib.lock(export_dir, workdir_lib.export_lock_path(export_dir))
                    )
            except workdir_lib.WorkdirLockedError as e:
                refused = str(e)
        if parallel.any_process(bool(refused)):
            raise workdir_lib.WorkdirLockedError(
                refused or f"{ctx.workdir} is in use by another run (see process 0)"
            )
        yield


def _check_export_dir(ctx: Context, export_dir: str) -> None:
    """A finished export that this work directory did not write is never overwritten."""
    ours = workdir_lib.export_location(ctx.workdir) == export_dir
    if pruned.is_finished(export_dir) and not ours:
        raise FileExistsError(
            f"export directory {export_dir} already holds a finished export; "
            "pass another --config.export_dir or --workdir"
        )


def _run(ctx: Context, arch: Arch, export_dir: str) -> dict:
    untrained = stages.describe(ctx, arch)
    with stop.phase("latency model"):
        method = stages.method_of(ctx, arch)
    with stop.phase("train"):
        dense_params = stages.train_dense(ctx, arch)
    with stop.phase("dense evaluation"):
        dense_top1 = ctx.evaluate(ctx.build(arch), {"params": dense_params})["top1"]
    with stop.phase("search"):
        variables, masked_model, search_ends = stages.search(ctx, arch, dense_params, method)
    stages.warn_fixup(ctx, method, search_ends)
    with stop.phase("search evaluation"):
        p_arch, p_params, searched = stages.evaluate_search(
            ctx, arch, method, variables, masked_model
        )
    with stop.phase("finetune"):
        p_params = stages.finetune(ctx, p_arch, p_params, arch, dense_params)
        p_params = method.recalibrate(arch, p_arch, p_params, ctx.calibration)
    with stop.phase("export"):
        model, loaded, multiple = tuning.export(ctx, arch, p_arch, p_params, export_dir)
    with stop.phase("final evaluation"):
        trace = summary.Trace(
            dense_params, dense_top1, search_ends, searched, p_arch, untrained, export_dir
        )
        s = summary.summarize(ctx, arch, method, trace, model, loaded, multiple)
    if ctx.is_chief:
        checkpoint.write_json(paths.join(ctx.workdir, "summary.json"), s)
    return s
