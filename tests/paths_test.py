"""Work directories on object stores: gs:// stays gs://, and what the project itself writes there
(stage records, seals, JSON, scalars) goes through etils.epath. gs:// is faked here with fsspec's
in-memory file system; orbax's own writes (tensorstore) cannot be faked offline."""

from __future__ import annotations

import importlib

import pytest
from conftest import tiny_config
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem

from amap_jax import workdir as workdir_lib
from amap_jax.io import paths
from amap_jax.train import checkpoint, scalars


class _FakeGcs(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=False, **kw):
        super().__init__(*args, **kw)


@pytest.fixture
def fake_gs(monkeypatch):
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath's fsspec backend
    registry = importlib.import_module("fsspec.registry")._registry  # (not fsspec.registry, a view)
    monkeypatch.setitem(registry, "gcs", _FakeGcs)
    backend.fsspec_backend._get_filesystem.cache_clear()
    _FakeGcs.store.clear()
    _FakeGcs.pseudo_dirs[:] = [""]
    yield "gs://bucket/runs/r1"
    backend.fsspec_backend._get_filesystem.cache_clear()
    _FakeGcs.store.clear()


def test_uris_stay_uris():
    assert paths.absolute("gs://b/run") == "gs://b/run"
    assert paths.join("gs://b/run", "export") == "gs://b/run/export"
    assert paths.normpath("gs://b/run/../other/./x") == "gs://b/other/x"
    assert paths.relpath("gs://b/run/export", "gs://b/run") == "export"
    assert paths.relpath("gs://c/elsewhere", "gs://b/run") == "gs://c/elsewhere"
    assert paths.relpath("/tmp/a/../b", "/tmp/a") == "/tmp/a/../b"


def test_json_seals_and_stage_records_on_gs(fake_gs):
    run = fake_gs
    paths.makedirs(paths.join(run, "dense", "7"))
    checkpoint.write_json(paths.join(run, "dense", "7", "a.json"), {"x": float("nan")})
    assert checkpoint.read_json(paths.join(run, "dense", "7", "a.json")) == {"x": None}
    assert not paths.exists(paths.join(run, "dense", "7", "a.json.tmp"))
    sealed = checkpoint.digest(paths.join(run, "dense"))
    assert list(sealed) == ["7/a.json"]
    assert checkpoint.verify(paths.join(run, "dense"), sealed) is None
    checkpoint.write_json(paths.join(run, "dense", "7", "a.json"), {"x": 1})
    assert "does not match" in checkpoint.verify(paths.join(run, "dense"), sealed)

    c = tiny_config()
    workdir_lib.record(run, c, "dense")
    workdir_lib.check(run, c)  # the same config: fine
    c.train.lr = c.train.lr * 2
    with pytest.raises(workdir_lib.ConfigChangedError, match="train.lr"):
        workdir_lib.check(run, c)
    workdir_lib.mark_export(run, paths.join(run, "export"))
    assert checkpoint.read_json(paths.join(run, workdir_lib.EXPORT_MARKER)) == {"path": "export"}
    assert workdir_lib.export_location(run) == "gs://bucket/runs/r1/export"


def test_scalars_on_gs(fake_gs):
    w = scalars.Scalars(fake_gs, "train", 0)
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
    w.close()
    again = scalars.Scalars(fake_gs, "train", 2)  # resumed at step 2
    again.write(3, {"loss": 30.0})
    again.close()
    assert [(r["step"], r["loss"]) for r in scalars.read(fake_gs)] == [(1, 1), (2, 2), (3, 30)]
