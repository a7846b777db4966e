"""Runs a pruning experiment: train -> search -> export -> finetune -> eval.

python train.py --config configs/fmnist_amap_vit.py --workdir /tmp/run
    [--config.search.target=0.6 ...]
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (checkpoints, export, summary).")
# Several processes (TPU pod slices, GPU clusters): how they find each other. They change where a
# run computes, not what: they are flags, not config entries.
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Start JAX's multi-process runtime from the environment (TPU pod, SLURM)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (implies --multihost)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout",
    300,
    "Seconds to wait for the other processes (and the coordinator) at start-up.",
    lower_bound=1,
)
flags.mark_flags_as_required(["config", "workdir"])


def _fail(msg: str, code: int = 2):
    from amap_jax import logs

    logs.end_bar()
    kind = "stopped" if code in (75, 129, 130) else "error"  # a stop signal is no error
    print(f"{kind}: {msg}", file=sys.stderr)
    sys.exit(code)


def _config():
    """The loaded config, or one line saying why the file did not load."""
    config = _CONFIG.value
    try:
        config.get("method")
    except OSError as e:
        missing = re.search(r"No such file or directory: '([^']+)'", str(e))
        _fail(f"config file {missing.group(1)} not found" if missing else str(e).splitlines()[-1])
    return config


def _loading_config(e: BaseException, argv) -> bool:
    """Whether `e` came out of the config file's own code (its get_config)."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    given += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files = {os.path.abspath(p.split(":")[0]) for p in given}
    tb = e.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) in files:
            return True
        tb = tb.tb_next
    return False


def _help():
    """Usage, flags and every config key with its default and meaning; exit 0."""
    from amap_jax import config_help

    own = flags.FLAGS.module_help(sys.modules[__name__]).strip().split("\n", 1)[1]
    text = f"{__doc__.strip()}\n\nflags:\n{own}\n\n{config_help.text()}\n"
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `train.py --help | head`
        from amap_jax import cli

        cli.reader_gone()
    sys.exit(0)


def _parse(argv):
    """absl's parser, with a one-line error instead of a traceback for a bad override."""
    if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        _help()
    try:
        return flags.FLAGS(argv)
    except Exception as e:
        if not isinstance(e, SyntaxError | ImportError) and _loading_config(e, argv):
            _fail(f"config file: get_config raised {type(e).__name__}: {e}")
        return _parse_error(e, argv)


def _parse_error(e: Exception, argv):
    from amap_jax import config as config_lib

    for a in argv:  # a section renamed since: absl knows no such flag
        key = a.split("=", 1)[0].removeprefix("--config.")
        new = a.startswith("--config.") and config_lib.renamed(key)
        if new:
            old = key.split(".", 1)[0]
            _fail(f"unknown config key {old!r} in {a} (it is called --config.{new} now)")
    try:
        raise e
    except (AttributeError, KeyError) as e:
        text = str(e).replace("\\", "")
        found = re.search(r"'([^']+)'", text)
        key = found.group(1) if found else text.splitlines()[0]
        hint = re.search(r'Did you mean "([^"]+)"', text)
        bad = [a for a in argv if a.startswith("--config.") and key in a]
        where = " ".join(bad) or "the overrides"
        homes = [f"--config.{name}.{key}" for name in config_lib.homes(key)]
        if homes:
            hint_text = f" (it is a setting of {' / '.join(homes)})"
        else:
            hint_text = f" (did you mean {hint.group(1)!r}?)" if hint else ""
        _fail(f"unknown config key {key!r} in {where}{hint_text}")
    except (SyntaxError, ImportError) as e:  # the config file itself
        where = f"{e.filename}, line {e.lineno}" if isinstance(e, SyntaxError) else str(e)
        _fail(f"config file does not load: {type(e).__name__} ({where})")
    except (flags.Error, ValueError, TypeError) as e:
        text = str(e)
        if "Error whilst parsing config file" in text:  # keep the cause, not absl's preamble
            flag = text.split(": Error whilst", 1)[0]
            cause = [line for line in text.splitlines() if line.strip()][-1]
            _fail(f"{flag}: {cause}")
        _fail(text.splitlines()[0])


def _where(summary: dict, workdir: str) -> str:
    """Where a finished run put what a user looks at next, every path absolute, and the
    TensorBoard command as it runs (the viewer beside this Python, where it is installed)."""
    from amap_jax.io import paths

    workdir = paths.absolute(workdir)
    viewer = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    viewer = viewer if os.path.exists(viewer) else "tensorboard"
    return (
        f"summary: {paths.join(workdir, 'summary.json')}; export: {summary['export_dir']}; "
        f"TensorBoard: {viewer} --logdir {paths.join(workdir, 'tensorboard')}"
    )


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from amap_jax import cli, logs, pipeline
    from amap_jax.train import parallel, stop

    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter out of the run log
    try:
        if _MULTIHOST.value or _COORDINATOR.value:
            parallel.initialize(
                _COORDINATOR.value,
                _NUM_PROCESSES.value,
                _PROCESS_ID.value,
                timeout=_DIST_TIMEOUT.value,
            )
        # SIGTERM and Ctrl-C: a flag every phase checks, from here on (after JAX's runtime,
        # whose preemption notifier would take SIGTERM over).
        stop.install()
        logs.setup(chief=parallel.is_chief())
        config = _config()
        summary = pipeline.run(config, _WORKDIR.value)
    except BaseException as e:  # expected failures end in one line; exit codes in amap_jax.cli
        described = cli.describe(e)
        if described is None:
            raise
        _fail(*described)
    if parallel.is_chief():
        print(pipeline.format_summary(summary))
        print(_where(summary, _WORKDIR.value))
    if not summary["budget"]["met"]:
        _fail(pipeline.budget_message(summary), cli.EXIT_BUDGET)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
