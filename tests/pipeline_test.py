"""The whole run on a tiny real data set, and what bad input does to it."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, snapshot, tiny_config

import amap_jax
from amap_jax import export_speed, pipeline
from amap_jax.data import DatasetNotFoundError


def test_run_writes_summary_and_export(finished_run):
    workdir, summary = finished_run
    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert summary["method"] == "amap"
    assert summary["target_macs_ratio"] == 0.6
    for k in ("dense", "pruned"):
        assert set(summary[k]) == {"params", "macs", "top1", "images_per_s", "cpu_kernels"}
        assert summary[k]["images_per_s"] > 0
    assert summary["pruned"]["macs"] <= 0.6 * summary["dense"]["macs"]
    assert summary["pruned"]["params"] < summary["dense"]["params"]
    # Digits is easy: a run that learnt nothing would sit near 10%.
    assert summary["dense"]["top1"] > 50 and summary["pruned"]["top1"] > 50
    # Export is exact: the masked model and the exported model agree before fine-tuning.
    assert summary["masked_top1"] == summary["pruned_before_finetune_top1"]
    assert summary["export_max_logit_diff"] <= 1e-5
    table = pipeline.format_summary(summary)
    assert "dense" in table and "pruned" in table and "ideal" in table
    # The speedup is the median of same-round ratios (dense and pruned interleaved), with range.
    low, high = summary["speedup_range"]
    assert summary["speed_rounds"] == pipeline.SPEED_ROUNDS and low <= summary["speedup"] <= high
    assert f"over {pipeline.SPEED_ROUNDS} interleaved rounds" in table
    # The budget as achieved by the export, beside what the search's own masks gave.
    b = summary["budget"]
    assert set(b) == {"kind", "target", "achieved", "tolerance", "met", "search_end", "fixup"}
    assert b["kind"] == "macs"
    assert b["target"] == 0.6 and b["tolerance"] == 0.02
    assert b["achieved"] == summary["macs_ratio"] and b["met"] == (abs(b["achieved"] - 0.6) <= 0.02)
    assert b["fixup"] == pytest.approx(b["search_end"] - b["achieved"], abs=1e-3)
    # Test numbers above; the validation split (carved from the training data) beside them.
    assert summary["splits"] == {"train": "train[:90%]", "val": "train[90%:]", "test": "test"}
    val = summary["val"]
    assert set(val) == {
        "dense_top1",
        "pruned_before_finetune_top1",
        "finetune_top1_by_epoch",
        "pruned_top1",
    }
    assert val["dense_top1"] > 50 and val["pruned_top1"] > 50
    assert [e for e, _ in val["finetune_top1_by_epoch"]] == [
        e for e, _ in summary["finetune_top1_by_epoch"]
    ]


def test_speedup_is_the_median_of_same_round_ratios_and_a_wide_spread_says_busy():
    quiet = {"dense": [100.0, 50.0, 100.0], "pruned": [130.0, 64.0, 128.0]}
    s = pipeline.speedup_of(quiet)  # the slow round slowed both: its ratio stays
    assert s == {
        "speedup": 1.28,
        "speedup_range": [1.28, 1.3],
        "speed_rounds": 3,
        "speed_busy": False,
    }
    busy = pipeline.speedup_of({"dense": [100.0, 100.0, 100.0], "pruned": [130.0, 80.0, 125.0]})
    assert busy["speed_busy"] and busy["speedup"] == 1.25
    summary = {
        "dense": {"params": 10, "macs": 100, "top1": 80.0, "images_per_s": 100.0},
        "pruned": {"params": 5, "macs": 70, "top1": 80.1, "images_per_s": 125.0},
        "macs_ratio": 0.7,
        "target_macs_ratio": 0.7,
        "ideal_speedup": 1.43,
        "method": "amap",
        **busy,
    }
    text = pipeline.format_summary(summary)
    assert "speedup 1.25x (0.80-1.30 over 3 interleaved rounds) (ideal 1.43x)" in text
    assert "the machine was busy" in text.splitlines()[-1]


def test_vtp_run_end_to_end_in_bfloat16(tmp_path):
    c = tiny_config()
    c.method = "vtp"
    c.model.dtype = "bfloat16"
    summary = pipeline.run(c, str(tmp_path / "w"))
    assert summary["method"] == "vtp" and summary["method_settings"]["vtp"]["rule"] == "target"
    assert summary["pruned"]["macs"] <= 0.6 * summary["dense"]["macs"]
    # the export check runs in float32 whatever the compute dtype: bfloat16 rounding (~1e-2)
    # would hide an export bug
    assert summary["export_max_logit_diff"] <= 1e-5
    assert summary["dense"]["top1"] > 50 and summary["pruned"]["top1"] > 50
    # VTP prunes residual inputs of q/k/v and fc1 (last two numbers per block), never q/k.
    blocks = summary["arch"]["pruned_blocks"]
    assert all(b[2] == 16 for b in blocks)  # micro: q/k width per head untouched
    assert any(b[5] < 32 or b[6] < 32 for b in blocks)
    model, _ = amap_jax.load_pruned(summary["export_dir"])
    assert any(b.attn_in or b.mlp_in for b in model.arch.blocks)
    # VTP's widths are its threshold's: no search-end ratio of its own; its scores' histogram
    assert summary["budget"]["search_end"] is None and summary["budget"]["fixup"] is None
    hist = summary["search_report"]["score_histogram"]
    assert len(hist["counts"]) == 30 and sum(hist["counts"]) > 0


def test_baseline_at_the_widths_of_another_run(finished_run, tmp_path):
    workdir, amap_summary = finished_run
    c = tiny_config()
    c.method, c.method_widths_from = "magnitude", workdir
    summary = pipeline.run(c, str(tmp_path / "w"))
    assert summary["arch"]["pruned_blocks"] == amap_summary["arch"]["pruned_blocks"]
    assert summary["pruned"]["macs"] == amap_summary["pruned"]["macs"]
    assert summary["export_max_logit_diff"] <= 1e-5


def test_load_pruned_gives_logits(finished_run):
    workdir, summary = finished_run
    model, variables = amap_jax.load_pruned(os.path.join(workdir, "export"))
    arch = model.arch
    assert arch.num_classes == 10 and arch.image_size == 8
    assert set(variables) == {"params"}  # nothing of the method is left
    assert not any(
        "reweight" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(variables)
    )
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    logits = model.apply(variables, x)
    assert logits.shape == (3, 10) and np.isfinite(np.asarray(logits)).all()
    n = sum(np.size(p) for p in jax.tree.leaves(variables["params"]))
    assert n == summary["pruned"]["params"]
    with open(os.path.join(workdir, "export", "model.json")) as f:
        meta = json.load(f)
    assert meta["input"]["image_size"] == 8 and len(meta["input"]["mean"]) == 1
    assert meta["num_classes"] == 10


def test_rerun_resumes_without_retraining(finished_run):
    workdir, summary = finished_run
    before = snapshot(os.path.join(workdir, "export"))
    again = pipeline.run(tiny_config(), workdir)
    for k in ("dense", "pruned"):
        assert again[k]["top1"] == summary[k]["top1"]
    assert snapshot(os.path.join(workdir, "export")) == before


def test_finished_export_dir_is_never_overwritten(finished_run, tmp_path):
    workdir, _ = finished_run
    c = tiny_config()
    c.export_dir = os.path.join(workdir, "export")
    before = snapshot(c.export_dir)
    with pytest.raises(FileExistsError, match="already holds a finished export"):
        pipeline.run(c, str(tmp_path / "other"))
    assert snapshot(c.export_dir) == before
    assert not (tmp_path / "other").exists()


def test_an_export_dir_in_use_by_another_run_is_refused(tmp_path):
    """Two runs, two work directories, one export_dir: the second is refused before it trains
    (it would have taken the first's export for its own); the lock sits beside the export."""
    from amap_jax import workdir as workdir_lib

    c = tiny_config()
    c.export_dir = str(tmp_path / "shared" / "export")
    lock = workdir_lib.export_lock_path(c.export_dir)
    assert lock == str(tmp_path / "shared" / "export.lock.json")
    with workdir_lib.lock(c.export_dir, lock):  # the first run, still going
        with pytest.raises(
            workdir_lib.WorkdirLockedError, match="pass another --config.export_dir"
        ):
            pipeline.run(c, str(tmp_path / "second"))
    assert not os.path.exists(lock) and not os.path.exists(c.export_dir)
    assert not os.path.exists(tmp_path / "second" / "dense")


def test_save_pruned_refuses_finished_export_and_wrong_class_names(finished_run, tmp_path):
    workdir, _ = finished_run
    model, variables = amap_jax.load_pruned(os.path.join(workdir, "export"))
    with pytest.raises(FileExistsError):
        amap_jax.save_pruned(os.path.join(workdir, "export"), model.arch, variables["params"])
    with pytest.raises(ValueError, match="3 class names for 10 classes"):
        amap_jax.save_pruned(str(tmp_path / "e"), model.arch, variables["params"], "abc")
    assert not (tmp_path / "e").exists()


def test_missing_dataset_fails_fast_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AMAP_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    c = tiny_config()
    c.data.name = "fashion_mnist"
    with pytest.raises(DatasetNotFoundError) as e:
        pipeline.run(c, str(tmp_path / "w"))
    assert "\n" not in str(e.value) and "dataset-fashion-mnist" in str(e.value)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5])
def test_target_outside_unit_interval_is_rejected(tmp_path, target):
    c = tiny_config()
    c.search.target = target
    with pytest.raises(ValueError, match=r"search.target must be in \(0, 1\]"):
        pipeline.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("seed", -1, "seed must be >= 0, got -1"),
        ("amap.init_spread", float("nan"), "amap.init_spread must be a finite number, got nan"),
        ("search.lr", float("inf"), "search.lr must be a finite number, got inf"),
        ("finetune.epochs", float("inf"), "finetune.epochs must be a finite number, got inf"),
    ],
)
def test_negative_seed_and_non_finite_settings_are_one_line_before_any_work(
    tmp_path, key, value, message
):
    c = tiny_config()
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ValueError) as e:
        pipeline.run(c, str(tmp_path / "w"))
    assert str(e.value) == message and not (tmp_path / "w").exists()


def test_config_files_that_do_not_load_are_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    raise RuntimeError('no such model')\n")
    for path, message in [
        (broken, f"error: config file does not load: SyntaxError ({broken}, line 1)"),
        (raising, "error: config file: get_config raised RuntimeError: no such model"),
    ]:
        r = _train_py("--config", str(path), "--workdir", str(tmp_path / "w"))
        assert r.returncode == 2 and r.stderr.strip() == message, r.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_a_stage_of_zero_steps_has_a_schedule():
    from amap_jax.train import steps

    for total in (0, 1, 2):
        lr = steps.schedule(1e-3, total, warmup_steps=5)
        assert all(float(lr(i)) >= 0 for i in range(3))


def _train_py(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_unknown_config_key_is_one_line(tmp_path):
    r = _train_py(
        "--config",
        os.path.join(ROOT, "configs/fmnist_amap_vit.py"),
        "--workdir",
        str(tmp_path / "w"),
        "--config.search.tagret=0.5",
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: unknown config key 'tagret' in --config.search.tagret=0.5 (did you mean 'target'?)"
    )
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "--config.search.similarity=False",
            "error: unknown config key 'similarity' in --config.search.similarity=False "
            "(it is a setting of --config.amap.similarity)",
        ),
        (
            "--config.amap.l1_weight=0.1",
            "error: unknown config key 'l1_weight' in --config.amap.l1_weight=0.1 "
            "(it is a setting of --config.vtp.l1_weight)",
        ),
        (
            "--config.floor.min_keep=3",
            "error: unknown config key 'floor' in --config.floor.min_keep=3 "
            "(it is called --config.baseline.min_keep now)",
        ),
        (
            "--config.compose.schedule=channels_first",
            "error: unknown config key 'compose' in --config.compose.schedule=channels_first "
            "(it is called --config.amap_asvit.schedule now)",
        ),
        (
            "--config.method=vpt",
            "error: method must be one of amap, asvit, amap+asvit, magnitude, random, vtp, "
            "got 'vpt'",
        ),
    ],
)
def test_cli_method_errors_are_one_line(tmp_path, override, message):
    r = _train_py(
        "--config",
        os.path.join(ROOT, "configs/fmnist_amap_vit.py"),
        "--workdir",
        str(tmp_path / "w"),
        override,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == message
    assert not (tmp_path / "w").exists()


def test_a_renamed_section_in_a_config_file_names_its_new_name():
    from amap_jax import config as config_lib

    for old, new in (("floor", "baseline"), ("compose", "amap_asvit")):
        c = tiny_config()
        c[old] = dict(c[new])
        named = f"unknown config key '{old}': it is called '{new}' now"
        with pytest.raises(ValueError, match=named):
            config_lib.validate(c)


def test_cli_bad_target_is_one_line(tmp_path):
    r = _train_py(
        "--config",
        os.path.join(ROOT, "configs/fmnist_amap_vit.py"),
        "--workdir",
        str(tmp_path / "w"),
        "--config.search.target=2",
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "search.target" in r.stderr


def test_help_exits_0_and_lists_every_config_key_with_its_default():
    from amap_jax import config as config_lib
    from amap_jax import methods

    r = _train_py("--help")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "--workdir" in out and "--config" in out
    defaults = config_lib.defaults()
    for section, value in defaults.items():
        if hasattr(value, "items"):
            for key, v in value.items():
                if not hasattr(v, "items"):
                    assert f"  {section}.{key}={v!r}" in out, (section, key)
        else:
            assert f"  {section}={value!r}" in out
    for section in methods.sections():
        assert f"{section}: settings of method" in out
    assert "baseline: settings of methods magnitude, random (" in out
    assert "amap_asvit: settings of method amap+asvit (" in out
    # each key's line is the comment beside it in the source
    line = next(x for x in out.splitlines() if x.strip().startswith("amap.linear_qk="))
    assert "Linear attention's q/k channels" in line
    line = next(x for x in out.splitlines() if x.strip().startswith("search.target="))
    assert line.rstrip().endswith("cost(pruned) / cost(dense), the cost being `budget_kind`'s")


def test_empty_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """`--workdir "$UNSET"`: one line, exit 2, nothing in the current directory."""
    r = _train_py("--config", os.path.join(ROOT, "configs/fmnist_amap_vit.py"), "--workdir", "")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: workdir is empty (an unset shell variable?): name a work directory"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="workdir is empty"):
        pipeline.run(tiny_config(), "  ")
    assert os.listdir(tmp_path) == []


def test_run_on_mock_tfds_dataset(tmp_path):
    """Any registered tfds data set runs through the same pipeline (faked: no download)."""
    import tensorflow_datasets as tfds

    c = tiny_config()
    c.data.name = "cifar10"
    c.data.data_dir = str(tmp_path / "tfds")
    c.train.epochs = c.search.epochs = c.finetune.epochs = 1.0
    c.amap.init = "constant"
    for stage in ("train", "search", "finetune"):
        c[stage].batch_size = 16
    c.eval.batch_size = 16
    with tfds.testing.mock_data(num_examples=48):
        summary = pipeline.run(c, str(tmp_path / "w"))
    model, variables = amap_jax.load_pruned(summary["export_dir"])
    assert model.arch.image_size == 32 and model.arch.in_chans == 3
    assert summary["pruned"]["macs"] <= 0.6 * summary["dense"]["macs"]


def test_swin_from_timm_weights_on_mock_imagenet(tmp_path):
    """Import -> search -> export -> finetune -> eval for a small Swin from a timm checkpoint,
    on mock ImageNet with the DeiT recipe (RandAugment, erasing, mixup/cutmix)."""
    import tensorflow_datasets as tfds
    import torch_reference

    torch, _ = torch_reference.load()
    ref = torch_reference.timm_model(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(2, 2, 4, 4),
    )
    checkpoint = str(tmp_path / "swin_micro.pth")
    torch.save(ref.state_dict(), checkpoint)

    c = tiny_config()
    c.data.name = "imagenet2012"
    c.data.train_split, c.data.test_split = "train", "validation"
    c.data.image_size = 32
    c.data.mixup_alpha, c.data.cutmix_alpha = 0.8, 1.0
    c.model.family, c.model.variant, c.model.pattern = "swin", "micro", "SSSS"
    c.model.gelu_approximate = False
    c.model.checkpoint = checkpoint
    c.train.epochs = 0.0
    for stage in ("search", "finetune"):
        c[stage].batch_size = 8
    c.search.epochs = c.finetune.epochs = 1.0
    c.finetune.kd_weight = 0.0
    c.amap.calibration_batch = 8
    c.eval.batch_size = 8
    with tfds.testing.mock_data(num_examples=24):
        summary = pipeline.run(c, str(tmp_path / "run"))
    assert summary["arch"]["dense"] == "Swin-micro"
    assert summary["pruned"]["macs"] <= 0.6 * summary["dense"]["macs"]
    assert summary["masked_top1"] == summary["pruned_before_finetune_top1"]
    assert summary["export_max_logit_diff"] <= 1e-5
    # The export is a Swin with the searched widths and the same windows.
    model, variables = amap_jax.load_pruned(os.path.join(str(tmp_path / "run"), "export"))
    assert model.arch.depths == (2, 2, 2, 2) and model.arch.blocks[1].shift == 2


def test_artifact_runs_with_jax_alone_and_predict_reads_images(finished_run, tmp_path):
    """A rerun with export_artifact on writes EXPORT/forward.jax; scripts/run_exported.py runs
    it without amap_jax and gives load_pruned's logits; `python -m amap_jax.predict` reads PNGs
    from a folder and names an unreadable file in one line."""
    from PIL import Image

    from amap_jax.data import load_source
    from amap_jax.io import artifact

    workdir = str(tmp_path / "w")
    shutil.copytree(finished_run[0], workdir)
    c = tiny_config()
    c.export_artifact = True
    summary = pipeline.run(c, workdir)  # every stage restored; only the artifact is new
    export = summary["export_dir"]
    assert export.startswith(workdir) and artifact.exists(export)
    model, variables = amap_jax.load_pruned(export)
    images = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "run_exported.py"), "--export", export,
         "--inputs", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and "amap_jax imported: False" in out.stdout, out.stderr[-2000:]
    expected = np.asarray(model.apply(variables, images))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)

    folder = tmp_path / "png"
    folder.mkdir()
    digits = load_source("digits", "test").get(np.arange(3))
    for i, img in enumerate(digits["image"]):
        Image.fromarray(img[..., 0]).save(folder / f"{i}.png")
    predict = [sys.executable, "-m", "amap_jax.predict", f"--export={export}"]
    out = subprocess.run([*predict, str(folder)], capture_output=True, text=True, cwd=ROOT)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 0 and len(rows) == 3, out.stderr[-2000:]
    assert all(len(r["top"]) == 5 and abs(sum(p for _, p in r["top"]) - 1) < 0.5 for r in rows)
    assert all(r["names"] == [str(k) for k, _ in r["top"]] for r in rows)  # digits' class names
    (folder / "broken.png").write_bytes(b"not an image")
    out = subprocess.run([*predict, str(folder)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().endswith(
        "broken.png: not a readable image (UnidentifiedImageError)"
    )


def test_artifact_of_a_swin_model_equals_its_forward():
    from conftest import param_shapes, random_params

    from amap_jax import models
    from amap_jax.io import artifact
    from amap_jax.models.arch import swin_arch

    arch = swin_arch("micro", pattern="LLSS")
    params = random_params(param_shapes(models.build(arch)), seed=0)["params"]
    forward = jax.export.deserialize(bytearray(artifact.serialize(arch, params))).call
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        forward(x), models.build(arch).apply({"params": params}, x), atol=1e-5
    )


def _tensorflow_reads_this_jax() -> bool:
    """Whether this TensorFlow's XLA deserializes the StableHLO this jax writes (jax 0.12
    writes StableHLO 1.18, which TensorFlow 2.21, the newest there is, cannot read)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    f = jax2tf.convert(lambda x: x * 2.0, polymorphic_shapes=["(b,)"], with_gradient=False)
    try:
        return float(tf.function(f)(tf.ones(2))[1]) == 2.0
    except tf.errors.OpError:
        return False


def test_savedmodel_gives_the_exports_logits(finished_run, tmp_path):
    """`python -m amap_jax.io.savedmodel` on a finished export: TensorFlow alone runs it (any
    batch size) and gives load_pruned's float32 logits; where this TensorFlow cannot read what
    this jax writes, the CLI says so in one line and leaves nothing behind."""
    from amap_jax.io import savedmodel

    export = os.path.join(finished_run[0], "export")
    out = str(tmp_path / "sm")
    cli = [sys.executable, "-m", "amap_jax.io.savedmodel", f"--export={export}", f"--out={out}"]
    run = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if not _tensorflow_reads_this_jax():
        assert run.returncode == 1 and not os.path.exists(out), run.stderr[-2000:]
        assert "cannot run the SavedModel that jax" in run.stderr.strip().splitlines()[-1]
        return
    assert run.returncode == 0 and f"wrote {out}" in run.stdout, run.stderr[-2000:]
    # one line, no library chatter (absl/orbax INFO, the TPU line, TensorFlow's start-up lines)
    assert run.stdout.strip() == f"wrote {out}" and run.stderr.strip() == "", run.stderr[-2000:]
    model, variables = amap_jax.load_pruned(export)
    forward = savedmodel.load(out)
    for n in (1, 6):
        images = np.random.default_rng(n).normal(size=(n, 8, 8, 1)).astype(np.float32)
        np.testing.assert_allclose(
            forward(images), model.apply(variables, images), atol=1e-5, rtol=0
        )
    run = subprocess.run(
        [*cli[:3], f"--export={tmp_path}"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode != 0 and "not an export directory" in run.stderr


def test_savedmodel_that_tensorflow_cannot_run_is_an_error(finished_run, tmp_path, monkeypatch):
    """What a TensorFlow older than jax's StableHLO does (jax 0.12 with TensorFlow 2.21): the
    write fails with the versions named, and leaves no SavedModel behind."""
    import tensorflow as tf

    from amap_jax.io import savedmodel

    model, variables = amap_jax.load_pruned(os.path.join(finished_run[0], "export"))

    def unreadable(directory):
        raise tf.errors.InvalidArgumentError(None, None, "failed to deserialize portable artifact")

    monkeypatch.setattr(savedmodel, "load", unreadable)
    out = str(tmp_path / "sm")
    with pytest.raises(RuntimeError, match=r"TensorFlow .* cannot run the SavedModel that jax"):
        savedmodel.write(out, model.arch, variables["params"])
    assert not os.path.exists(out)
    monkeypatch.setattr(savedmodel, "load", lambda d: lambda x: np.zeros((len(x), 10), np.float32))
    with pytest.raises(RuntimeError, match="logits differ from the model's"):
        savedmodel.write(out, model.arch, variables["params"])
    assert not os.path.exists(out)


def test_run_writes_scalars_of_every_stage(finished_run):
    from scalars_test import read_events

    from amap_jax.train import scalars

    workdir, _ = finished_run
    lines = scalars.read(workdir)
    for stage in ("train", "search", "finetune"):
        mine = [r for r in lines if r["stage"] == stage]
        steps = [r["step"] for r in mine if "loss" in r]
        assert steps and steps == sorted(set(steps)), stage
        assert all(r["lr"] > 0 for r in mine if "loss" in r), stage
    assert any("test_top1" in r for r in lines if r["stage"] == "finetune")
    assert any("macs_ratio" in r for r in lines if r["stage"] == "search")
    tags = {tag for tag, _, _ in read_events(os.path.join(workdir, scalars.EVENTS))}
    assert {"train/loss", "train/lr", "search/loss", "finetune/test_top1"} <= tags


def test_padded_export_gives_the_same_predictions(finished_run, tmp_path, monkeypatch):
    """export_pad=0 on a copy of a finished run: only the export is redone, each block's
    attention and MLP padded to the multiples the calibration chose (here a fixed choice: the
    measuring is padding_test's), with the unpadded export's top-1 and its pruned MACs beside
    the padded."""
    workdir, summary = finished_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "export"))
    os.remove(os.path.join(copy, "export_dir.json"))
    n = len(summary["arch"]["pruned_blocks"])
    chosen = [((8, 16), (16, 8))[i % 2] for i in range(n)]
    monkeypatch.setattr(
        export_speed,
        "measured",
        lambda arch, params, batch: (
            chosen,
            {"per_layer": chosen, "shapes": {}, "gains": {"per layer": 1.1}, "choice": "per layer"},
        ),
    )
    c = tiny_config()
    c.export_pad = 0
    padded = pipeline.run(c, copy)
    assert [tuple(p) for p in padded["export_pad"]] == chosen
    assert padded["pruned"]["top1"] == summary["pruned"]["top1"]
    assert padded["pruned"]["macs"] == summary["pruned"]["macs"]
    assert padded["pruned"]["padded_macs"] > padded["pruned"]["macs"]
    assert padded["arch"] == summary["arch"]  # the pruned widths, not the padded ones
    assert "export padded per block (attention, MLP): 8/16 16/8" in pipeline.format_summary(padded)
    model, _ = amap_jax.load_pruned(os.path.join(copy, "export"))
    for b, (attn_m, mlp_m) in zip(model.arch.blocks, chosen, strict=True):
        assert b.qk_dim % attn_m == 0 and b.v_dim % attn_m == 0 and b.mlp_dim % mlp_m == 0
    with pytest.raises(ValueError, match="export stage made with another config"):
        c.export_pad = 16
        pipeline.run(c, copy)


def test_measured_cpu_kernels_compile_the_export_and_its_speed(finished_run, tmp_path, monkeypatch):
    """cpu_kernels="measure" on a copy of a finished run: model.json names the set measured
    fastest for the export, the summary times each model with its own set, and the export's
    forward pass (what predict runs) compiles with model.json's (the measuring itself is
    xla_cpu_test's)."""
    from amap_jax import xla_cpu
    from amap_jax.io import pruned

    workdir, summary = finished_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "export"))
    os.remove(os.path.join(copy, "export_dir.json"))
    measured, timed = [], []

    def fastest(arch, params, batch, **kw):  # the export first, then the dense model
        measured.append(arch.num_classes)
        return ("ynn_reduce", "default")[len(measured) > 1], {}

    def paired(runs, batch, **kw):  # dense and pruned timed together, each with its set
        timed.extend(kernels for *_, kernels in runs.values())
        return {name: [100.0] * pipeline.SPEED_ROUNDS for name in runs}

    monkeypatch.setattr(export_speed, "fastest_kernels", fastest)
    monkeypatch.setattr(pipeline.evaluate_lib, "paired_throughput", paired)
    c = tiny_config()
    c.cpu_kernels = "measure"
    got = pipeline.run(c, copy)
    assert len(measured) == 2
    assert sorted(timed) == ["default", "ynn_reduce"]
    assert (got["dense"]["cpu_kernels"], got["pruned"]["cpu_kernels"]) == ("default", "ynn_reduce")
    assert "CPU kernels: dense default, pruned ynn_reduce" in pipeline.format_summary(got)
    with open(os.path.join(got["export_dir"], "model.json")) as f:
        meta = json.load(f)
    assert meta["cpu_kernels"] == "ynn_reduce"
    assert meta["cpu_compiler_options"] == xla_cpu.SETS["ynn_reduce"]  # for run_exported.py
    compiled = []
    real = xla_cpu.jit
    monkeypatch.setattr(
        xla_cpu, "jit", lambda fn, k="default", **kw: compiled.append(k) or real(fn, k)
    )
    forward = pruned.forward(got["export_dir"])
    assert compiled == ["ynn_reduce"]
    model, variables = amap_jax.load_pruned(got["export_dir"])
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(forward(x), model.apply(variables, x), atol=1e-5)


def test_run_exported_compiles_with_the_exports_cpu_compiler_options(tmp_path):
    """scripts/run_exported.py applies model.json's `cpu_compiler_options` where this jaxlib
    knows them and drops them where it does not; the logits are the model's either way."""
    import importlib.util

    from conftest import param_shapes, random_params

    from amap_jax import models, xla_cpu
    from amap_jax.io import artifact
    from amap_jax.models.arch import vit_arch

    spec = importlib.util.spec_from_file_location(
        "run_exported", os.path.join(ROOT, "scripts", "run_exported.py")
    )
    run_exported = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_exported)
    arch = vit_arch("mini", image_size=8, patch_size=4, in_chans=1, num_classes=3)
    params = random_params(param_shapes(models.build(arch)), seed=0)["params"]
    artifact.write(str(tmp_path), arch, params)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
    expected = np.asarray(models.build(arch).apply({"params": params}, x))
    assert run_exported.compiler_options({}) == {}  # none recorded
    known = "ynn_reduce" in xla_cpu.usable()  # the jaxlib this test runs with takes it
    for options, used in [
        (xla_cpu.SETS["ynn_reduce"], xla_cpu.SETS["ynn_reduce"] if known else {}),
        ({"xla_cpu_no_such_option": "1"}, {}),
    ]:
        meta = {"cpu_compiler_options": options}
        (tmp_path / "model.json").write_text(json.dumps(meta))
        assert run_exported.compiler_options(meta) == used
        got = np.asarray(run_exported.load(str(tmp_path), allow_unverified=True)(x))
        np.testing.assert_allclose(got, expected, atol=1e-5)
