"""The deployable export never lies: every load path (load_pruned, `amap_jax.predict`, the
jax-only `scripts/run_exported.py`) checks what it reads against model.json's manifest, and
bad input to the two command-line tools ends in one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import amap_jax
from amap_jax.io import artifact, images, pruned

_spec = importlib.util.spec_from_file_location(
    "run_exported", os.path.join(ROOT, "scripts", "run_exported.py")
)
run_exported = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_exported)


@pytest.fixture(scope="module")
def export_with_artifact(finished_run, tmp_path_factory):
    """A copy of the tiny run's export, with its forward.jax (read only: copy before changing)."""
    export = str(tmp_path_factory.mktemp("export") / "export")
    shutil.copytree(os.path.join(finished_run[0], "export"), export)
    pruned.add_artifact(export)
    return export


@pytest.fixture
def export(export_with_artifact, tmp_path):
    dest = str(tmp_path / "export")
    shutil.copytree(export_with_artifact, dest)
    return dest


def _images(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def _flip(path, offset, n=32):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_manifest_lists_every_file_and_the_fields(export):
    meta = json.loads(open(os.path.join(export, "model.json")).read())
    manifest = meta["manifest"]
    files = {
        os.path.relpath(os.path.join(r, f), export)
        for r, _, fs in os.walk(export)
        for f in fs
        if f != "model.json"
    }
    assert set(manifest) == files | {"model.json"}
    assert manifest["model.json"] == pruned.fields_digest(meta)
    # The artifact gives load_pruned's logits, through every loader.
    model, variables = amap_jax.load_pruned(export)
    expected = np.asarray(model.apply(variables, _images()))
    for forward in (pruned.forward(export), run_exported.load(export)):
        np.testing.assert_allclose(np.asarray(forward(_images())), expected, atol=1e-5)


def test_flipped_bytes_in_the_artifact_are_refused_everywhere(export):
    _flip(os.path.join(export, artifact.FILE), 1000)
    match = r"forward.jax does not match its checksum in model.json"
    with pytest.raises(ValueError, match=match):
        pruned.forward(export)
    with pytest.raises(run_exported.ExportError, match=match):
        run_exported.load(export)


def test_truncated_artifact_is_one_line(export):
    path = os.path.join(export, artifact.FILE)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="does not match its checksum") as e:
        pruned.forward(export)
    assert "\n" not in str(e.value)
    # Without a checksum to compare with, the file itself is refused in one line.
    with pytest.raises(ValueError, match=r"is not a jax.export artifact \(") as e:
        artifact.load(export)
    assert "\n" not in str(e.value)


def test_edited_model_json_is_refused_by_every_loader(export):
    path = os.path.join(export, "model.json")
    meta = json.loads(open(path).read())
    meta["input"]["std"] = [0.5]
    open(path, "w").write(json.dumps(meta, indent=1))
    match = r"model.json was changed after export \(its fields do not match its manifest\)"
    with pytest.raises(ValueError, match=match):
        amap_jax.load_pruned(export)
    with pytest.raises(ValueError, match=match):
        pruned.forward(export)
    with pytest.raises(run_exported.ExportError, match=match):
        run_exported.read_meta(export)


def test_an_export_without_a_manifest_is_refused_unless_the_user_allows_it(export, tmp_path):
    """A manifest removed from model.json, or "format": 1 (exports from before manifests),
    turned every check off: a corrupt forward.jax ran. Now each loader refuses in one line
    unless told otherwise, and then still runs what it can read."""
    path = os.path.join(export, "model.json")
    meta = json.loads(open(path).read())
    legacy = {**{k: v for k, v in meta.items() if k != "manifest"}, "format": 1}
    open(path, "w").write(json.dumps(legacy, indent=1))
    with pytest.raises(ValueError, match="has no manifest .*export format 1.*allow_unverified"):
        amap_jax.load_pruned(export)
    with pytest.raises(ValueError, match="has no manifest"):
        pruned.forward(export)
    assert pruned.forward(export, allow_unverified=True)(_images()).shape == (3, 10)
    png = str(tmp_path / "a.png")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    r, lines = _cli("-m", "amap_jax.predict", f"--export={export}", png)
    assert r.returncode == 2 and len(lines) == 1 and "has no manifest" in lines[0], r.stderr
    r, _ = _cli("-m", "amap_jax.predict", f"--export={export}", "--allow_unverified", png)
    assert r.returncode == 0, r.stderr[-2000:]

    # run_exported: the manifest gone, or the artifact's entry gone from it
    x = str(tmp_path / "x.npy")
    np.save(x, _images())
    out = str(tmp_path / "y.npy")
    args = ["--export", export, "--inputs", x, "--out", out]
    with pytest.raises(run_exported.ExportError, match="has no manifest"):
        run_exported.load(export)
    assert run_exported.main(args) == 2
    assert run_exported.main([*args, "--allow_unverified"]) == 0
    meta["manifest"] = {k: v for k, v in meta["manifest"].items() if k != artifact.FILE}
    open(path, "w").write(json.dumps(meta, indent=1))
    with pytest.raises(run_exported.ExportError, match="forward.jax is not in model.json's"):
        run_exported.load(export)
    assert run_exported.load(export, allow_unverified=True)(_images()).shape == (3, 10)


def _cli(*args, cwd=ROOT):
    r = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    return r, lines


def test_predict_refuses_a_corrupt_artifact_and_bad_flags(export, tmp_path):
    from PIL import Image

    png = str(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    r, lines = _cli("-m", "amap_jax.predict", f"--export={export}", png)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, r.stderr[-2000:]
    assert not any("Unable to initialize backend" in x for x in lines)  # no TPU chatter
    for flag, message in [
        ("--batch_size=0", "error: flag --batch_size=0: 0 is not a positive integer"),
        ("--top=0", "error: flag --top=0: 0 is not a positive integer"),
    ]:
        r, lines = _cli("-m", "amap_jax.predict", f"--export={export}", flag, png)
        assert r.returncode == 2 and lines == [message], r.stderr[-2000:]
    _flip(os.path.join(export, artifact.FILE), 1000)
    r, lines = _cli("-m", "amap_jax.predict", f"--export={export}", png)
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].endswith(
        "forward.jax does not match its checksum in model.json (corrupt "
        "or changed after export); restore it or export again"
    )


def test_sixteen_bit_images_are_scaled_by_their_depth(tmp_path):
    from PIL import Image

    meta = {"input": {"image_size": 8, "channels": 1, "mean": [0.0], "std": [1.0]}}
    values = np.random.default_rng(0).integers(0, 256, (8, 8))
    Image.fromarray(values.astype(np.uint8)).save(tmp_path / "a8.png")
    Image.fromarray((values * 257).astype(np.uint16)).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode == "I;16"
    eight = images.read_image(str(tmp_path / "a8.png"), meta)
    sixteen = images.read_image(str(tmp_path / "a16.png"), meta)
    np.testing.assert_allclose(sixteen, eight, atol=1e-6)
    assert sixteen.max() > 0.5  # not clipped at 255 / 65535
    # Resized too, like an 8-bit image.
    Image.fromarray((np.kron(values, np.ones((2, 2))) * 257).astype(np.uint16)).save(
        tmp_path / "b16.png"
    )
    assert images.read_image(str(tmp_path / "b16.png"), meta).shape == (8, 8, 1)


def test_huge_image_is_one_line(tmp_path):
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 M pixels, a few kilobytes
    meta = {"input": {"image_size": 8, "channels": 1, "mean": [0.0], "std": [1.0]}}
    with pytest.raises(images.ImageError) as e:
        images.read_image(str(path), meta)
    assert str(e.value) == (
        f"{path}: Image size (400000000 pixels) exceeds limit of 178956970 pixels; downscale "
        "it first"
    )


def test_run_exported_bad_input_is_one_line(export, tmp_path, capsys):
    x = str(tmp_path / "x.npy")
    np.save(x, _images())
    np.save(tmp_path / "shape.npy", np.zeros((2, 9, 8, 1), np.float32))
    np.save(tmp_path / "none.npy", np.zeros((0, 8, 8, 1), np.float32))
    (tmp_path / "img.png").write_bytes(b"\x89PNG not npy")
    no_artifact = str(tmp_path / "no_artifact")
    shutil.copytree(export, no_artifact)
    os.remove(os.path.join(no_artifact, artifact.FILE))
    cases = [
        (export, tmp_path / "shape.npy", "y.npy", "holds an array of shape (2, 9, 8, 1); the "
         "model takes [N, *(8, 8, 1)]"),
        (export, tmp_path / "none.npy", "y.npy", "holds no images (N=0)"),
        (export, tmp_path / "img.png", "y.npy", "img.png is not a .npy file of numbers"),
        (export, tmp_path / "missing.npy", "y.npy", "missing.npy: no such file"),
        (no_artifact, x, "y.npy", "forward.jax is missing (exported with export_artifact=false?)"),
        (export, x, "no/such/dir/y.npy", "dir is not a writable folder"),
    ]  # fmt: skip
    for directory, inputs, out, message in cases:
        code = run_exported.main(
            ["--export", directory, "--inputs", str(inputs), "--out", str(tmp_path / out)]
        )
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (message, err)
        assert err[0].endswith(message), err
    assert run_exported.main(["--export", export, "--inputs", x, "--out", str(tmp_path / "y")]) == 0
    assert np.load(tmp_path / "y.npy").shape == (3, 10)
