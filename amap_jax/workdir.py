"""What a work directory remembers: the config that made each stage, and where its export went.

A rerun resumes a stage only if the config still computes the same thing there; a changed
setting that would change a started stage (or any stage before it) is refused with the keys
that differ. Settings that never change results (logging, checkpoint interval, device count,
where the data lies) may change freely.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from etils import epath

from amap_jax import config as config_lib
from amap_jax import methods
from amap_jax.io import paths, trees
from amap_jax.logs import log as logging

RECORD = "stages.json"
EXPORT_MARKER = "export_dir.json"
STAGES = ("dense", "search", "finetune", "export")
# Config entries each stage depends on, besides those of the stages before it.
_KEYS = {
    "dense": ("seed", "data", "model", "train"),
    "search": ("method", "method_widths_from", "search", "<method sections>"),
    "finetune": ("finetune",),
    "export": ("export_pad",),
}
# Entries inside those that never change a result.
_FREE = (
    "data.data_dir",
    "data.image_folder",
    "data.val_split",
    "data.test_split",
    "search.target_tolerance",
    "search.latency_tolerance",
)


def _new_name(key: str) -> str:
    """`key` (a flat entry or a section) under today's section names (`config.RENAMED`): a work
    directory made before a rename compares its records under the new names."""
    return config_lib.renamed(key) or key


class ConfigChangedError(ValueError):
    """A rerun of a work directory with a config that changes what a started stage computes."""


def _flat(value, prefix: str) -> dict:
    if hasattr(value, "items"):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def stage_config(config, stage: str) -> dict:
    """The config entries that determine `stage` (its own and every earlier stage's)."""
    out = {}
    for s in STAGES[: STAGES.index(stage) + 1]:
        for key in _KEYS[s]:
            keys = (
                methods.get(config["method"]).sections() if key == "<method sections>" else (key,)
            )
            for k in keys:
                if k in config:
                    out.update(_flat(config[k], k))
    return {k: v for k, v in out.items() if k not in _FREE}


def _started(workdir: str, stage: str) -> bool:
    directory = paths.join(workdir, stage)
    if stage == "export":
        return paths.exists(paths.join(workdir, EXPORT_MARKER))
    return paths.isdir(directory) and any(n.isdigit() for n in paths.listdir(directory))


def _read(workdir: str) -> dict:
    path = paths.join(workdir, RECORD)
    records = trees.read_json(path) if paths.exists(path) else {}
    return {
        stage: {_new_name(k): v for k, v in entries.items()} for stage, entries in records.items()
    }


def _legacy(workdir: str) -> dict:
    """Work directories written before stage records: their config.json is the last run's."""
    path = paths.join(workdir, "config.json")
    if paths.exists(paths.join(workdir, RECORD)) or not paths.exists(path):
        return {}
    old = {_new_name(k): v for k, v in trees.read_json(path).items()}
    try:
        return {s: stage_config(old, s) for s in STAGES}
    except (KeyError, ValueError):
        return {}


def check(workdir: str, config) -> None:
    """Refuses (one line) a config that changes what a started stage of `workdir` computes."""
    records, legacy = _read(workdir), _legacy(workdir)
    for stage in STAGES:
        if stage not in (records or legacy) or not _started(workdir, stage):
            continue
        old, new = (records or legacy)[stage], stage_config(config, stage)
        if legacy:  # settings have moved between sections since: compare what both have
            new = {k: v for k, v in new.items() if k in old}
            old = {k: v for k, v in old.items() if k in new}
        # A setting added since the stage was made is no change at its default value.
        new = {k: v for k, v in new.items() if k in old or v != _default(k)}
        diff = [
            f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
        if diff:
            shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise ConfigChangedError(
                f"{workdir} has a {stage} stage made with another config ({shown}); "
                "rerun with those values or pass another --workdir"
            )


def record(workdir: str, config, stage: str) -> None:
    """Remembers the config a stage is being made with (before its first checkpoint)."""
    records = _read(workdir)
    records[stage] = stage_config(config, stage)
    trees.write_json(paths.join(workdir, RECORD), records)


def export_location(workdir: str) -> str | None:
    """Where this work directory's finished export went (stored relative when inside it)."""
    path = paths.join(workdir, EXPORT_MARKER)
    if not paths.exists(path):
        return None
    return paths.normpath(paths.join(workdir, trees.read_json(path)["path"]))


def mark_export(workdir: str, export_dir: str) -> None:
    path = paths.relpath(export_dir, workdir)  # relative when inside the work directory
    trees.write_json(paths.join(workdir, EXPORT_MARKER), {"path": path})


def _default(key: str):
    flat = {}
    for k, v in config_lib.defaults().items():
        flat.update(_flat(v, k))
    return flat.get(key, _MISSING)


_MISSING = object()


# ----------------------------------------------------------------------------------------------
# One run at a time per work directory

LOCK = "lock.json"


class WorkdirLockedError(ValueError):
    """Another run holds the work directory."""


def _started_at(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc), or None where unknown: with
    the pid it tells a live holder from a new process that reuses the number."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    started = holder.get("started_at")
    return started is None or _started_at(pid) in (None, started)


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": _started_at(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _create(path: str, text: str) -> bool:
    """Creates `path` holding `text` unless it exists: written aside, then linked into place
    (atomic on a local disk; a reader never sees half of it)."""
    if not paths.is_local(path):  # object stores have no exclusive create: best effort
        if paths.exists(path):
            return False
        paths.write_atomic(path, text)
        return True
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def _holder(path: str) -> dict | None:
    try:
        return json.loads(paths.read_text(path))
    except FileNotFoundError:
        return None  # released meanwhile
    except ValueError:
        return {}


def export_lock_path(export_dir: str) -> str:
    """The lock of an export directory outside its work directory: a file beside it, so the
    export itself holds only what its manifest lists."""
    path = paths.normpath(export_dir)
    return f"{path}.lock.json"


@contextlib.contextmanager
def lock(workdir: str, path: str | None = None):
    """Holds WORKDIR/lock.json (or `path`; host, pid) for the block. A second run refuses in
    one line naming the holder; a lock left by a dead process of this host (kill -9) is taken
    over."""
    path = path or paths.join(workdir, LOCK)
    paths.makedirs(str(epath.Path(path).parent))
    me = _me()
    for _ in range(3):
        if _create(path, json.dumps(me)):
            break
        holder = _holder(path)
        if holder is None:
            continue
        if holder.get("host") == me["host"] and not _alive(holder):
            logging.warning(
                "%s: taking over the lock of process %s, which is gone", workdir, holder.get("pid")
            )
            with contextlib.suppress(FileNotFoundError):
                epath.Path(path).unlink()
            continue
        since = f" since {holder['since']}" if holder.get("since") else ""
        gone = "" if holder.get("host") == me["host"] else f"; if that run is gone, delete {path}"
        other = "--workdir" if path.endswith(f"/{LOCK}") else "--config.export_dir"
        raise WorkdirLockedError(
            f"{workdir} is in use by another run (pid {holder.get('pid')} on "
            f"{holder.get('host')}{since}); wait for it to end or pass another {other}{gone}"
        )
    else:
        raise WorkdirLockedError(f"cannot take the lock {path}: it keeps changing")
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == me["pid"]:
            with contextlib.suppress(OSError):
                epath.Path(path).unlink()
