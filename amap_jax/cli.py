"""How the command line ends: one line and a documented exit code for every expected failure.

| exit | meaning |
|---|---|
| 0 | finished; the summary is printed and in WORKDIR/summary.json |
| 1 | an unexpected error (a bug): traceback |
| 2 | bad input: config, data, checkpoints, pretrained files, export or work directories, disk |
| 3 | training diverged (non-finite loss or gradient); the last good checkpoint is kept |
| 4 | finished, but the export misses its MACs target by more than `search.target_tolerance` |
| 75 | preempted (SIGTERM), in any phase: nothing finished is lost; rerun to resume (EX_TEMPFAIL) |
| 129 | the terminal closed (SIGHUP), in any phase: likewise |
| 130 | interrupted (Ctrl-C), in any phase: likewise |
"""

from __future__ import annotations

import errno
import os
import sys

from amap_jax.train.loop import Diverged
from amap_jax.train.stop import Interrupted, Preempted

EXIT_ERROR = 2
EXIT_DIVERGED = 3
EXIT_BUDGET = 4

_WRITE_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EDQUOT, errno.EPERM}
_FULL = {errno.ENOSPC, errno.EDQUOT}


def parse_flags(argv):
    """absl's flag parser for a command line: a bad flag is one line and exit 2, not a usage
    text."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def reader_gone():
    """stdout's reader went away (`| head`): it has what it wanted; end quietly, exit 0."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe(e: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for an expected failure; None for a bug (let it raise)."""
    if isinstance(e, Preempted | Interrupted):
        return f"{_first_line(e)}; run the same command to resume", e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return "interrupted before training started; nothing to save", Interrupted.exit_code
    if isinstance(e, Diverged):
        return _first_line(e), EXIT_DIVERGED
    if isinstance(e, OSError) and e.errno in _WRITE_ERRORS and e.filename:
        full = "; free space and rerun (what was saved is kept)" if e.errno in _FULL else ""
        return f"cannot write {e.filename}: {e.strerror}{full}", EXIT_ERROR
    if isinstance(e, ValueError | OSError | RuntimeError | ImportError):
        return _first_line(e), EXIT_ERROR
    return None
