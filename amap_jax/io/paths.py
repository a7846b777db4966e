"""Work directories and exports on a local disk or on any file system orbax writes to (gs://,
s3://), through etils.epath, the path library orbax uses. `os.path` would turn
`gs://bucket/run` into a local `./gs:/bucket/run`; everything here keeps a URI a URI."""

from __future__ import annotations

import errno
import importlib.util
import os
import posixpath
import shutil

from etils import epath

# Packages a scheme needs beside etils: epath reads and writes it through them, or through
# TensorFlow's file systems where TensorFlow is installed.
SCHEME_PACKAGES = {"gs": ("gcsfs", "amap_jax[gcs]"), "s3": ("s3fs", "s3fs")}


def is_local(path) -> bool:
    return "://" not in str(path)


def check_scheme(path) -> None:
    """A one-line ImportError now, before any work, when `path`'s file system needs a package
    that is not installed (gs:// needs gcsfs)."""
    if is_local(path):
        return
    scheme = str(path).split("://", 1)[0]
    package, install = SCHEME_PACKAGES.get(scheme, (None, None))
    have = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    if package and not have(package) and not have("tensorflow"):
        raise ImportError(f"{path}: {scheme}:// paths need {package}: pip install '{install}'")


def absolute(path) -> str:
    return os.path.abspath(path) if is_local(path) else str(path)


def normpath(path: str) -> str:
    if is_local(path):
        return os.path.normpath(path)
    scheme, rest = str(path).split("://", 1)
    return f"{scheme}://{posixpath.normpath(rest)}"


def join(base, *names) -> str:
    return str(epath.Path(base).joinpath(*names))


def relpath(path: str, start: str) -> str:
    """`path` relative to `start`, or `path` itself when it is not under `start`."""
    if is_local(path) and is_local(start):
        rel = os.path.relpath(path, start)
        return path if rel.startswith("..") else rel
    prefix = str(start).rstrip("/") + "/"
    return str(path)[len(prefix) :] if str(path).startswith(prefix) else str(path)


def exists(path) -> bool:
    return epath.Path(path).exists()


def isdir(path) -> bool:
    return epath.Path(path).is_dir()


def makedirs(path) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
    return [p.name for p in epath.Path(path).iterdir()]


def rmtree(path) -> None:
    epath.Path(path).rmtree()


def move(src, dst) -> None:
    epath.Path(src).rename(dst)


def read_text(path) -> str:
    return epath.Path(path).read_text()


def read_bytes(path) -> bytes:
    return epath.Path(path).read_bytes()


def write_atomic(path, data: str | bytes) -> None:
    """Written to a temporary name, then renamed: a reader never sees half a file."""
    tmp = epath.Path(f"{path}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)


def files(directory) -> list[str]:
    """Every file under `directory`, as paths relative to it."""
    root = epath.Path(directory)
    out = []
    for where, _, names in root.walk():
        rel = str(where)[len(str(root)) :].lstrip("/")
        out += [posixpath.join(rel, n) if rel else n for n in names]
    return sorted(out)


def ensure_space(path: str, size: int) -> None:
    """A one-line OSError (ENOSPC) naming `path` before writing `size` bytes there on a local
    disk that cannot hold them: a save that fills the disk fails deep inside orbax's threads,
    with hundreds of lines of tracebacks."""
    if not is_local(path):
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    need = int(size * 1.1) + (256 << 10)  # metadata and orbax's own files
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)} ({need / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free)",
            path,
        )
