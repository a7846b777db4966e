"""Faults and bad input: each ends in one clear line and a documented exit code, loses nothing
that was saved, and never produces a silently wrong result (the README's table, row by row)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, snapshot, tiny_config

import amap_jax
from amap_jax import cli, pipeline
from amap_jax import workdir as workdir_lib
from amap_jax.data import DataError, load_source
from amap_jax.io import pretrained
from amap_jax.train import checkpoint
from amap_jax.train.checkpoint import Checkpointer, CheckpointError
from amap_jax.train.loop import Diverged

# ----------------------------------------------------------------------------------------------
# The command line: one line, a documented exit code, nothing written


def _train_py(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _one_line(r, code: int) -> str:
    assert r.returncode == code, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr
    return lines[-1]


def test_missing_config_file(tmp_path):
    r = _train_py("--config", "configs/nope.py", "--workdir", str(tmp_path / "w"))
    assert _one_line(r, 2) == "error: config file configs/nope.py not found"
    assert not (tmp_path / "w").exists()


def test_config_variant_that_fails_keeps_its_cause(tmp_path):
    r = _train_py("--config", "configs/imagenet_amap.py:bogus", "--workdir", str(tmp_path / "w"))
    line = _one_line(r, 2)
    assert line.startswith("error: flag --config=configs/imagenet_amap.py:bogus: ValueError:")
    assert "unknown model 'bogus'; one of flatten_swin_t" in line


def test_unwritable_workdir_names_the_path():
    # /sys refuses new directories even to root (EPERM, or EROFS where it is mounted read-only).
    r = _train_py("--config", "configs/fmnist_amap_vit.py", "--workdir", "/sys/amap_jax_test")
    assert _one_line(r, 2).startswith("error: cannot write /sys/amap_jax_test: ")


def test_full_disk_is_one_line():
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/search/200")
    assert cli.describe(e) == ("cannot write /w/search/200: No space left on device", 2)
    assert cli.describe(KeyError("a bug")) is None  # bugs keep their traceback


def test_eval_section_is_checked_before_training(tmp_path):
    c = tiny_config()
    c.eval.batch_size = 0
    with pytest.raises(ValueError, match=r"eval.batch_size must be in \[1, inf\], got 0"):
        pipeline.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "method,setting,value,match",
    [
        ("amap", "min_keep_fraction", 0.9, "amap cannot reach MACs ratio 0.6: 0.9"),
        ("magnitude", "min_keep", 40, "magnitude cannot reach MACs ratio 0.6"),
        ("vtp", "min_keep", 64, "vtp cannot reach MACs ratio 0.6"),
    ],
)
def test_unreachable_target_fails_before_training(tmp_path, method, setting, value, match):
    c = tiny_config()
    c.method = method
    c[{"magnitude": "floor"}.get(method, method)][setting] = value
    with pytest.raises(ValueError, match=match):
        pipeline.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------
# Data files


def _idx(path, array: np.ndarray, truncate: int = 0) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = gzip.compress(header + array.astype(np.uint8).tobytes())
    with open(path, "wb") as f:
        f.write(data[: len(data) - truncate] if truncate else data)


def _fashion_dir(tmp_path, *, n=(6, 4), labels=None, truncate=0, raw=None):
    d = tmp_path / "fmnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        count = n[0] if split == "train" else n[1]
        _idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (count, 28, 28)))
        y = labels if labels is not None and split == "train" else rng.integers(0, 10, count)
        _idx(
            d / f"{prefix}-labels-idx1-ubyte.gz", np.asarray(y), truncate if split == "test" else 0
        )
    if raw is not None:
        (d / "t10k-images-idx3-ubyte.gz").write_bytes(raw)
    return d


def _load(monkeypatch, d):
    monkeypatch.setenv("AMAP_FASHION_MNIST_DIR", str(d))
    return load_source("fashion_mnist", "train[:3]")


def test_truncated_gzip_names_the_file(tmp_path, monkeypatch):
    d = _fashion_dir(tmp_path, truncate=9)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: truncated or not a gzip"):
        _load(monkeypatch, d)


def test_non_gzip_file_names_the_file(tmp_path, monkeypatch):
    d = _fashion_dir(tmp_path, raw=b"<html>not found</html>")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: truncated or not a gzip"):
        _load(monkeypatch, d)


def test_labels_out_of_range_are_refused_at_load(tmp_path, monkeypatch):
    d = _fashion_dir(tmp_path, labels=[0, 1, 2, 3, 10, 12])
    with pytest.raises(
        DataError, match=r"fashion_mnist train: label 10 outside \[0, 10\) \(2 such"
    ):
        _load(monkeypatch, d)


def test_image_and_label_counts_must_agree_even_when_sliced(tmp_path, monkeypatch):
    d = _fashion_dir(tmp_path, labels=[0, 1, 2, 3, 4])  # 6 images, 5 labels; split train[:3]
    with pytest.raises(DataError, match=r"holds 6 images but .*train-labels.* 5 labels"):
        _load(monkeypatch, d)


# ----------------------------------------------------------------------------------------------
# Pretrained files


def _pth(path, obj):
    import torch

    torch.save(obj, path)
    return str(path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("random.pth", os.urandom(4096), r"is not a PyTorch checkpoint \(not a zip archive"),
        ("empty.pth", b"", r"is empty \(0 bytes\)"),
        ("empty.safetensors", b"", r"is empty \(0 bytes\)"),
        (
            "header.safetensors",
            struct.pack("<Q", 40) + b'{"w": {"dtype": "F32", "shape": [2',
            r"is not a valid safetensors file \(Error while deserializing header",
        ),
    ],
)
def test_broken_pretrained_file_is_one_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(amap_jax.CheckpointMismatchError, match=match) as e:
        pretrained.read_state_dict(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_random_bytes_are_always_a_one_line_error(tmp_path):
    """torch's legacy unpickler reads a non-zip file and fails on random bytes in many ways
    (it once raised a bare IndexError here): every one is the same one-line error."""
    path = tmp_path / "random.pth"
    rng = np.random.default_rng(0)
    for _ in range(200):
        path.write_bytes(rng.bytes(int(rng.integers(1, 4096))))
        with pytest.raises(amap_jax.CheckpointMismatchError, match="is not a PyTorch checkpoint"):
            pretrained.read_state_dict(str(path))


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    import torch

    _RunsCode.marker = str(tmp_path / "ran")
    path = _pth(tmp_path / "evil.pth", {"model": {"w": torch.zeros(2)}, "x": _RunsCode()})
    with pytest.raises(amap_jax.CheckpointMismatchError, match="pickled posix.system") as e:
        pretrained.read_state_dict(path)
    assert "weights_only=False" not in str(e.value)  # never advise running it
    assert not os.path.exists(_RunsCode.marker)


# ----------------------------------------------------------------------------------------------
# Work directories and exports


def _copy(finished, tmp_path, name="copy"):
    workdir, summary = finished
    dest = tmp_path / name
    shutil.copytree(workdir, dest)
    return str(dest), summary


def test_changed_config_on_a_finished_workdir_is_refused(finished_run, tmp_path):
    workdir, _ = _copy(finished_run, tmp_path)
    before = snapshot(workdir)
    for key, value, named in [
        ("search.target", 0.5, "search.target 0.6 -> 0.5"),
        ("seed", 7, "seed 0 -> 7"),
        ("train.lr", 1e-2, "train.lr 0.002 -> 0.01"),
    ]:
        c = tiny_config()
        section, _, leaf = key.rpartition(".")
        (c[section] if section else c)[leaf] = value
        with pytest.raises(workdir_lib.ConfigChangedError) as e:
            pipeline.run(c, workdir)
        assert named in str(e.value) and "another --workdir" in str(e.value)
    assert snapshot(workdir) == before  # nothing rewritten, not even config.json


def test_workdir_from_before_stage_records_is_checked_too(finished_run, tmp_path):
    """Older work directories have no stages.json: their config.json is the last run's."""
    workdir, _ = _copy(finished_run, tmp_path)
    os.remove(os.path.join(workdir, workdir_lib.RECORD))
    c = tiny_config()
    c.search.target = 0.5
    with pytest.raises(workdir_lib.ConfigChangedError, match="search.target 0.6 -> 0.5"):
        pipeline.run(c, workdir)


def test_settings_that_change_no_result_may_change(finished_run, tmp_path):
    workdir, summary = _copy(finished_run, tmp_path)
    c = tiny_config()
    c.eval.batch_size, c.checkpoint_every = 50, 7
    again = pipeline.run(c, workdir)
    assert again["pruned"]["top1"] == summary["pruned"]["top1"]


def test_moved_workdir_still_finds_its_export(finished_run, tmp_path):
    workdir, summary = _copy(finished_run, tmp_path, "moved")
    again = pipeline.run(tiny_config(), workdir)
    assert again["export_dir"] == os.path.join(workdir, "export")
    assert again["pruned"]["top1"] == summary["pruned"]["top1"]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path, caplog):
    """Bit rot in the last fine-tuning checkpoint: the one before is used, the stage redone
    from there, and the export is bit-identical to the uninterrupted run's."""
    workdir, summary = _copy(finished_run, tmp_path)
    shutil.rmtree(os.path.join(workdir, "export"))
    os.remove(os.path.join(workdir, workdir_lib.EXPORT_MARKER))
    stage = os.path.join(workdir, "finetune")
    latest = max(int(n) for n in os.listdir(stage) if n.isdigit())
    _flip_a_byte(os.path.join(stage, str(latest)))
    again = pipeline.run(tiny_config(), workdir)
    assert "is corrupt" in caplog.text and "resuming from the one before it" in caplog.text
    assert os.path.isdir(os.path.join(f"{stage}.corrupt", str(latest)))
    assert again["pruned"]["top1"] == summary["pruned"]["top1"]
    _assert_same_export(finished_run[0], workdir)


def _assert_same_export(workdir_a, workdir_b):
    """Same architecture, bit-identical weights (the files differ in their timestamps)."""
    model_a, a = amap_jax.load_pruned(os.path.join(workdir_a, "export"))
    model_b, b = amap_jax.load_pruned(os.path.join(workdir_b, "export"))
    assert model_a.arch == model_b.arch
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _flip_a_byte(directory):
    files = sorted(
        os.path.join(r, f)
        for r, _, fs in os.walk(directory)
        for f in fs
        if f != checkpoint.SEAL and os.path.getsize(os.path.join(r, f)) > 64
    )
    with open(files[-1], "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_every_checkpoint_corrupt_is_one_line(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "c"))
    tree = {"w": np.arange(100, dtype=np.float32)}
    for step in (1, 2):
        ckpt.save(step, tree)
    ckpt.close()
    for step in (1, 2):
        _flip_a_byte(str(tmp_path / "c" / str(step)))
    with pytest.raises(CheckpointError, match="cannot restore checkpoint step 2 .* checksum"):
        Checkpointer(str(tmp_path / "c")).restore(tree)


def test_corrupt_export_weights_are_detected(finished_run, tmp_path):
    workdir, _ = _copy(finished_run, tmp_path)
    _flip_a_byte(os.path.join(workdir, "export", "params"))
    with pytest.raises(CheckpointError, match="are corrupt: file .* does not match its checksum"):
        amap_jax.load_pruned(os.path.join(workdir, "export"))


def test_broken_model_json_names_its_path(finished_run, tmp_path):
    workdir, _ = _copy(finished_run, tmp_path)
    path = os.path.join(workdir, "export", "model.json")
    with open(path, "a") as f:
        f.write("}")
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        amap_jax.load_pruned(os.path.join(workdir, "export"))


def test_weights_that_do_not_match_model_json(finished_run, tmp_path):
    workdir, _ = _copy(finished_run, tmp_path)
    path = os.path.join(workdir, "export", "model.json")
    meta = checkpoint.read_json(path)
    meta["arch"]["blocks"][0]["mlp_dim"] += 1
    checkpoint.write_json(path, meta)
    with pytest.raises(CheckpointError, match=r"do not match .*model.json: block_0/mlp/fc1/bias"):
        amap_jax.load_pruned(os.path.join(workdir, "export"))


# ----------------------------------------------------------------------------------------------
# Divergence and interruptions


def test_divergence_stops_the_run_and_exports_nothing(tmp_path):
    c = tiny_config()
    c.train.lr = 1e6
    c.checkpoint_every = 5
    workdir = str(tmp_path / "w")
    with pytest.raises(Diverged, match=r"train diverged at step \d+ .*last good checkpoint kept"):
        pipeline.run(c, workdir)
    assert not os.path.exists(os.path.join(workdir, "export"))
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert cli.describe(Diverged("x"))[1] == 3
    # Whatever was saved is from before the divergence: finite.
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "dense")) if n.isdigit()]
    for step in steps:
        state = Checkpointer(os.path.join(workdir, "dense"))._manager.restore(step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_summary_is_standard_json(tmp_path):
    path = str(tmp_path / "s.json")
    checkpoint.write_json(path, {"loss": float("nan"), "x": [1.0, float("inf")]})
    with open(path) as f:
        text = f.read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "x": [1.0, None]}


def test_kill_and_preemption_in_every_stage_give_the_uninterrupted_export(finished_run, tmp_path):
    """kill -9 in training, search and fine-tuning, then SIGTERM (saves, exit 75), then a clean
    finish: the export is bit-identical to an uninterrupted run's."""
    workdir = str(tmp_path / "w")
    config = TINY_CONFIG
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = ("--config", config, "--workdir", workdir)
    for fault in ("SIGKILL@train:25", "SIGKILL@search:10", "SIGKILL@finetune:8"):
        r = _train_py(*args, env={**env, "AMAP_FAULT": fault})
        assert r.returncode == -signal.SIGKILL, (fault, r.stderr[-2000:])
    r = _train_py(*args, env={**env, "AMAP_FAULT": "SIGTERM@finetune:21"})
    line = _one_line(r, 75)
    assert line == (
        "stopped: finetune preempted (SIGTERM) at step 21; checkpoint saved; "
        "run the same command to resume"
    )
    assert not any(
        ".orbax-checkpoint-tmp" in n for n in os.listdir(os.path.join(workdir, "finetune"))
    )
    r = _train_py(*args, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_export(finished_run[0], workdir)


def test_ctrl_c_twice_saves_once_and_prints_one_line(tmp_path):
    workdir = str(tmp_path / "w")
    config = TINY_CONFIG
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "AMAP_FAULT": "SIGINT@train:5",
    }
    # The fault sends the first SIGINT from inside; the test sends a second one right after.
    p = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, "--workdir", workdir],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    stage = os.path.join(workdir, "dense")
    while p.poll() is None and not (os.path.isdir(stage) and "5" in os.listdir(stage)):
        time.sleep(0.01)
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "stopped: train interrupted at step 5; checkpoint saved; run the same command to resume"
    )
    assert Checkpointer(stage).latest_step() == 5
