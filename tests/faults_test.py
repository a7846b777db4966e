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
from amap_jax import cli, methods, pipeline
from amap_jax import workdir as workdir_lib
from amap_jax.data import DataError, load_source
from amap_jax.io import pretrained, pruned
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
    assert cli.describe(e) == (
        "cannot write /w/search/200: No space left on device; free space and rerun (what was "
        "saved is kept)",
        2,
    )
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
    c[{"magnitude": "baseline"}.get(method, method)][setting] = value
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


def _old_names(entries: dict) -> dict:
    """Flat config entries (or sections) under the section names used before the renames."""
    before = {"baseline": "floor", "amap_asvit": "compose"}
    out = {}
    for k, v in entries.items():
        section, dot, rest = k.partition(".")
        out[f"{before.get(section, section)}{dot}{rest}"] = v
    return out


def _started_stages(workdir, *stages):
    for stage in stages:
        os.makedirs(os.path.join(workdir, stage, "1"))  # a checkpoint step: the stage started


@pytest.mark.parametrize(
    "method,setting,value,named",
    [
        ("magnitude", "min_keep", 3, "baseline.min_keep 1 -> 3"),
        ("amap+asvit", "schedule", "channels_first", "amap_asvit.schedule 'joint' ->"),
    ],
)
def test_stage_records_under_renamed_sections_still_resume(tmp_path, method, setting, value, named):
    """stages.json written when the sections were `floor` and `compose` matches the config
    under their new names; a real change is still refused."""
    workdir = str(tmp_path / "w")
    c = tiny_config()
    c.method = method
    records = {s: _old_names(workdir_lib.stage_config(c, s)) for s in ("dense", "search")}
    assert any(k.startswith(("floor.", "compose.")) for k in records["search"])
    _started_stages(workdir, "dense", "search")
    with open(os.path.join(workdir, workdir_lib.RECORD), "w") as f:
        json.dump(records, f)
    workdir_lib.check(workdir, c)  # the same settings under new names: resumes
    c[methods.get(method).section][setting] = value
    with pytest.raises(workdir_lib.ConfigChangedError, match=named):
        workdir_lib.check(workdir, c)


def test_config_json_under_renamed_sections_still_resumes(tmp_path):
    """A work directory from before stage records whose config.json has a `floor` section."""
    workdir = str(tmp_path / "w")
    c = tiny_config()
    c.method = "magnitude"
    _started_stages(workdir, "dense", "search")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(_old_names(json.loads(c.to_json())), f)
    workdir_lib.check(workdir, c)
    c.baseline.min_keep = 3
    with pytest.raises(workdir_lib.ConfigChangedError, match="baseline.min_keep 1 -> 3"):
        workdir_lib.check(workdir, c)


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
    meta["manifest"]["model.json"] = pruned.fields_digest(meta)  # consistent, other weights
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


def test_kill_and_preemption_in_every_phase_give_the_uninterrupted_export(finished_run, tmp_path):
    """kill -9 in training, search and fine-tuning (each leaves a stale lock behind), SIGTERM in
    a training loop (saves, exit 75) and outside one (the evaluation after the search, the
    export, the final evaluation: exit 75, nothing lost), then a clean finish: the export is
    bit-identical to an uninterrupted run's."""
    workdir = str(tmp_path / "w")
    config = TINY_CONFIG
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = ("--config", config, "--workdir", workdir)
    for fault in ("SIGKILL@train:25", "SIGKILL@search:10"):
        r = _train_py(*args, env={**env, "AMAP_FAULT": fault})
        assert r.returncode == -signal.SIGKILL, (fault, r.stderr[-2000:])
    r = _train_py(*args, env={**env, "AMAP_FAULT": "SIGTERM@search evaluation"})
    assert _one_line(r, 75) == (
        "stopped: search evaluation preempted (SIGTERM); run the same command to resume"
    )
    assert "taking over the lock of process" in r.stderr  # the kill -9 left it
    r = _train_py(*args, env={**env, "AMAP_FAULT": "SIGKILL@finetune:8"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = _train_py(*args, env={**env, "AMAP_FAULT": "SIGTERM@finetune:21"})
    line = _one_line(r, 75)
    assert line == (
        "stopped: finetune preempted (SIGTERM) at step 21; checkpoint saved; "
        "run the same command to resume"
    )
    assert not any(
        ".orbax-checkpoint-tmp" in n for n in os.listdir(os.path.join(workdir, "finetune"))
    )
    for phase in ("export", "final evaluation"):
        r = _train_py(*args, env={**env, "AMAP_FAULT": f"SIGTERM@{phase}"})
        assert _one_line(r, 75) == (
            f"stopped: {phase} preempted (SIGTERM); run the same command to resume"
        )
        assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))  # released
    r = _train_py(*args, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == (
        f"summary: {workdir}/summary.json; export: {workdir}/export; "
        f"TensorBoard: {os.path.dirname(sys.executable)}/tensorboard --logdir "
        f"{workdir}/tensorboard"
    )  # every path absolute, the viewer beside the Python that ran the job
    _assert_same_export(finished_run[0], workdir)


def _start(workdir, *overrides, fault=None):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        **({"AMAP_FAULT": fault} if fault else {}),
    }
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY_CONFIG, "--workdir",
         workdir, *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip


def _wait_for(path, p, timeout=120):
    end = time.time() + timeout
    while p.poll() is None and not os.path.exists(path) and time.time() < end:
        time.sleep(0.01)
    assert os.path.exists(path), p.communicate()[1][-2000:]


def test_ctrl_c_twice_saves_once_and_prints_one_line(tmp_path):
    workdir = str(tmp_path / "w")
    # The fault sends the first SIGINT from inside; the test sends a second one right after.
    p = _start(workdir, fault="SIGINT@train:5")
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


def test_ctrl_c_pressed_three_times_is_never_lost(tmp_path):
    """Three presses 20 ms apart while training: a flag, never an exception from the handler
    (which a garbage-collector callback could swallow), so the run always stops, once."""
    for trial in range(2):
        workdir = str(tmp_path / f"w{trial}")
        p = _start(workdir)
        _wait_for(os.path.join(workdir, "scalars.jsonl"), p)
        time.sleep(0.5 * trial)
        for _ in range(3):
            p.send_signal(signal.SIGINT)
            time.sleep(0.02)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("stopped: train interrupted at step ") and last.endswith(
            "; checkpoint saved; run the same command to resume"
        ), err[-2000:]
        step = int(last.split("at step ")[1].split(";")[0])
        assert Checkpointer(os.path.join(workdir, "dense")).latest_step() == step


def test_second_run_on_a_workdir_refuses_and_the_first_lands_off_budget(tmp_path):
    """Run A holds the work directory; run B, started meanwhile, refuses at once in one line
    naming A. A trains nothing (train.epochs=0: warned) and asks for an exact budget
    (target_tolerance=0), which its export misses: exit 4, export and summary kept."""
    workdir = str(tmp_path / "w")
    overrides = ("--config.train.epochs=0", "--config.search.target_tolerance=0")
    a = _start(workdir, *overrides)
    _wait_for(os.path.join(workdir, workdir_lib.LOCK), a)
    b = _start(workdir, *overrides)
    _, err_b = b.communicate(timeout=120)
    assert b.returncode == 2, err_b[-2000:]
    line = [x for x in err_b.splitlines() if x.strip()][-1]
    assert line.startswith(f"error: {workdir} is in use by another run (pid {a.pid} on ")
    assert line.endswith("; wait for it to end or pass another --workdir")
    out_a, err_a = a.communicate(timeout=300)
    assert a.returncode == 4, err_a[-2000:]
    assert "the dense model is untrained (train.epochs=0 and no model.checkpoint)" in err_a
    summary = json.loads(open(os.path.join(workdir, "summary.json")).read())
    b_ = summary["budget"]
    assert b_["target"] == 0.6 and b_["tolerance"] == 0 and not b_["met"]
    assert summary["dense_untrained"] is True
    assert err_a.strip().splitlines()[-1] == (
        f"error: the export's MACs ratio {b_['achieved']:.3f} misses its target 0.6 by more "
        f"than search.target_tolerance=0.0; the export is kept in {workdir}/export"
    )
    assert "dense" in out_a and os.path.exists(os.path.join(workdir, "export", "model.json"))
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))


def test_stale_and_foreign_locks(tmp_path, caplog):
    import socket

    workdir = str(tmp_path)
    path = os.path.join(workdir, workdir_lib.LOCK)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid}, f)
    with workdir_lib.lock(workdir):
        assert json.load(open(path))["pid"] == os.getpid()
    assert f"taking over the lock of process {dead.pid}, which is gone" in caplog.text
    assert not os.path.exists(path)
    with open(path, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "since": "2026-01-01 00:00:00"}, f)
    with pytest.raises(workdir_lib.WorkdirLockedError) as e:
        with workdir_lib.lock(workdir):
            pass
    assert str(e.value) == (
        f"{workdir} is in use by another run (pid 1 on elsewhere since 2026-01-01 00:00:00); "
        f"wait for it to end or pass another --workdir; if that run is gone, delete {path}"
    )


def test_full_disk_is_one_line_and_the_rerun_finishes(finished_run, tmp_path):
    """The work directory on a 300 kB tmpfs (a mount namespace of its own): the first
    checkpoint does not fit: one line naming it, exit 2; with room, the rerun finishes with
    the uninterrupted run's export."""
    mount, keep = tmp_path / "mnt", tmp_path / "kept"
    mount.mkdir()
    run = (
        f"XLA_FLAGS=--xla_force_host_platform_device_count=2 {sys.executable} train.py "
        f"--config {TINY_CONFIG} --workdir {mount}/w"
    )
    script = (
        f"mount -t tmpfs -o size=300k tmpfs {mount} && {{ {run} 2>{tmp_path}/err1; "
        f"echo $? > {tmp_path}/rc1; mount -o remount,size=50m {mount} && {run} 2>{tmp_path}/err2;"
        f" echo $? > {tmp_path}/rc2; cp -r {mount}/w {keep}; }}"
    )
    r = subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=ROOT, timeout=600,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    err1 = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "2", err1[-2000:]
    assert "Traceback" not in err1
    last = err1.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {mount}/w/dense/20: No space left on device (")
    assert last.endswith("MB free); free space and rerun (what was saved is kept)")
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()[-2000:]
    _assert_same_export(finished_run[0], str(keep))


def test_disk_full_inside_orbax_is_the_oserror_it_is():
    with pytest.raises(OSError) as e:
        with checkpoint.disk_errors("/w/search/40"):
            raise ValueError(
                'RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file "/w/'
                'search/40.orbax-checkpoint-tmp/": Failed to write 20576 bytes to file 8: No '
                "space left on device [os_error_code='28']"
            )
    assert cli.describe(e.value) == (
        "cannot write /w/search/40: No space left on device; free space and rerun (what was "
        "saved is kept)",
        2,
    )
    with pytest.raises(ValueError, match="another failure"):  # anything else stays itself
        with checkpoint.disk_errors("/w"):
            raise ValueError("another failure")


# ----------------------------------------------------------------------------------------------
# Several processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_is_one_line(tmp_path):
    port = _free_port()  # on loopback, and nothing listens there
    t = time.time()
    r = _train_py("--config", TINY_CONFIG, "--workdir", str(tmp_path / "w"),
                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  "--process_id=1", "--distributed_timeout=2")  # fmt: skip
    assert _one_line(r, 2) == (
        f"error: the coordinator 127.0.0.1:{port} did not answer within 2 s "
        "(--distributed_timeout): is process 0 running, and is the address right?"
    )
    assert time.time() - t < 60
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ("--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"),
            "error: --process_id=2 must be in [0, 2) (--num_processes=2)",
        ),
        (
            ("--coordinator_address=nohost", "--num_processes=2", "--process_id=0"),
            "error: --coordinator_address must be HOST:PORT, got 'nohost'",
        ),
        (
            ("--config.num_devices=-1",),
            "error: num_devices must be >= 0 (0: all visible devices), got -1",
        ),
    ],
)
def test_bad_process_settings_are_one_line(tmp_path, args, message):
    r = _train_py("--config", TINY_CONFIG, "--workdir", str(tmp_path / "w"), *args)
    assert _one_line(r, 2) == message
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------
# Runs that cannot do what was asked: refused before anything is written


@pytest.mark.parametrize(
    "setting,value,message",
    [
        ("data.train_split", "train[:0]", "data: split 'train[:0]' of digits is empty"),
        (
            "search.batch_size",
            2048,
            "search.batch_size 2048 is larger than the 1347 training images of 'train[:90%]': "
            "not one full batch",
        ),
    ],
)
def test_empty_split_or_no_full_batch_is_refused_first(tmp_path, setting, value, message):
    c = tiny_config()
    section, leaf = setting.split(".")
    c[section][leaf] = value
    with pytest.raises(ValueError) as e:
        pipeline.run(c, str(tmp_path / "w"))
    assert str(e.value) == message
    assert not (tmp_path / "w").exists()


def test_missing_runtime_packages_are_named_before_the_run(tmp_path, monkeypatch):
    """A dependency the run needs at its very end (flatbuffers for forward.jax; gcsfs for
    gs://) is checked before anything is written, not after hours of training."""
    import importlib.util

    real = importlib.util.find_spec
    missing = {"flatbuffers", "gcsfs", "tensorflow"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    c = tiny_config()
    c.export_artifact = True
    with pytest.raises(ImportError) as e:
        pipeline.run(c, str(tmp_path / "w"))
    assert str(e.value) == (
        "writing export/forward.jax needs the flatbuffers package: pip install flatbuffers "
        "(or --config.export_artifact=false)"
    )
    assert not (tmp_path / "w").exists()
    c.export_artifact = False
    with pytest.raises(ImportError) as e:
        pipeline.run(c, "gs://bucket/run")
    assert str(e.value) == "gs://bucket/run: gs:// paths need gcsfs: pip install 'amap_jax[gcs]'"
    assert cli.describe(e.value) == (str(e.value), 2)


def test_progress_bar_fits_the_terminal_and_log_lines_clear_it(monkeypatch, capsys):
    import io
    import logging

    from amap_jax import logs
    from amap_jax.train.loop import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(logs, "width", lambda: 60)
    handler = logs._Handler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("amap_jax_progress_test")
    logger.addHandler(handler)
    p = Progress("finetune", 1000, 0, enabled=True)
    for step in (10, 20):
        p.last = 0.0
        p.update(step, {"loss": 1.44, "accuracy": 0.5, "macs_ratio": 0.7})
    logger.warning("finetune epoch 1 step 20: loss=1.44")
    p.last = 0.0
    p.update(1000, {"loss": 1.0})
    text = err.getvalue()
    drawn = [chunk for chunk in text.split("\r\x1b[K") if chunk]
    # Every redraw starts by clearing the line, is cut to the width, and a log line starts
    # on a cleared line and ends its own.
    assert all(len(chunk.rstrip("\n")) < 60 for chunk in drawn), drawn
    assert drawn[2] == "finetune epoch 1 step 20: loss=1.44\n"
    assert drawn[1].startswith("finetune [") and drawn[-1].endswith("\n")
    logger.removeHandler(handler)


def test_closed_terminal_saves_and_stops_like_a_preemption(tmp_path):
    """SIGHUP (the terminal closed) mid-training: a checkpoint of that step and exit 129, as
    for SIGTERM (whose resume the test above checks)."""
    workdir = str(tmp_path / "w")
    p = _start(workdir, "--config.train.epochs=0.1", fault="SIGHUP@train:2")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 129, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "stopped: train hung up (SIGHUP: the terminal closed) at step 2; checkpoint saved; "
        "run the same command to resume"
    )
    assert Checkpointer(os.path.join(workdir, "dense")).latest_step() == 2
