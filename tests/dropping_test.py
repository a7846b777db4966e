"""Token dropping in one compiled program (`models.tokens.dropping`): the same logits as the
masked forward and as each image alone, whatever the bucket; no host round trip; carried by the
`forward.jax` artifact; buckets as a setting (`asvit.buckets`, `ViTArch.token_buckets`)."""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import jax
import numpy as np
import pytest
from conftest import ROOT, param_shapes, random_images, random_params

from amap_jax import methods, models
from amap_jax.io import artifact, pruned
from amap_jax.methods.amap_asvit import AmapAsVit
from amap_jax.methods.asvit import AsVit
from amap_jax.models import tokens
from amap_jax.models.arch import ViTArch, arch_from_dict, vit_arch

POINTS = (1, 2, 3)


def _arch(distilled=False):
    """65 tokens (66 distilled): 64 patches of 2x2 pixels on 16x16 images; buckets of 4; a
    batch in 4 parts (the artifact's symbolic batch too: 1 and 5 images leave parts empty)."""
    arch = vit_arch(
        "mini",
        in_chans=1,
        num_classes=10,
        pattern="SSSS",
        image_size=16,
        patch_size=2,
        distilled=distilled,
    )
    return arch.replace(
        token_points=POINTS, token_buckets=tokens.multiples(arch, 4), token_groups=tokens.GROUPS
    )


@functools.cache
def _model(distilled=False):
    """A token-dropping model with random weights, whose thresholds keep 20-30 / 15-25 /
    15-25 patch tokens of 64 on `random_images(arch, 6, 1)`: at every point these images
    alone fall in different buckets (checked below)."""
    arch = _arch(distilled)
    model = models.build(arch)
    params = random_params(param_shapes(model)["params"], 0)
    params["token_gate"]["thresholds"] = np.asarray([1.0, 1.1, 1.2], np.float32)
    return model, {"params": params}


def _masked(model, variables, images):
    return np.asarray(jax.jit(model.apply)(variables, images))


def _bucket(buckets, count):
    return int(np.searchsorted(buckets, count))


@pytest.mark.parametrize("distilled", [False, True], ids=["cls", "cls+dist"])
def test_one_program_equals_the_masked_forward_and_each_image_alone(distilled):
    model, variables = _model(distilled)
    arch = model.arch
    images = random_images(arch, 6, 1)
    masked = _masked(model, variables, images)
    forward = jax.jit(tokens.dropping(model))
    logits, counts = forward(variables, images)
    assert float(np.abs(np.asarray(logits) - masked).max()) <= 1e-5
    # The batch in parts sorted by count, padded parts included (4 parts of 6 images: 2, 2,
    # 2 and 0): the same logits and each image's counts in its own row.
    for groups in (1, 2, 4, 8):
        logits_g, counts_g = jax.jit(tokens.dropping(model, groups=groups))(variables, images)
        assert float(np.abs(np.asarray(logits_g) - masked).max()) <= 1e-5, groups
        np.testing.assert_array_equal(np.asarray(counts_g), np.asarray(counts))
    buckets = tokens.buckets_of(arch)
    own = []
    for i in range(len(images)):
        alone, count = forward(variables, images[i : i + 1])
        assert float(np.abs(np.asarray(alone) - masked[i : i + 1]).max()) <= 1e-5
        np.testing.assert_array_equal(np.asarray(count[0]), np.asarray(counts[i]))
        own.append([_bucket(buckets, c + arch.num_prefix) for c in np.asarray(count[0])])
    # At every point the images alone take different buckets (so do the parts of the batch).
    own = np.asarray(own)
    assert all(len(set(own[:, k])) > 1 for k in range(len(POINTS))), own
    assert np.asarray(counts).max() < arch.grid**2  # tokens were dropped


def test_any_buckets_give_the_same_logits():
    model, variables = _model()
    images = random_images(model.arch, 5, 2)
    masked = _masked(model, variables, images)
    for buckets in [(65,), (16, 32, 48, 65), tokens.default_buckets(model.arch)]:
        logits, _ = tokens.predict(model, variables, images, buckets=buckets)
        assert float(np.abs(np.asarray(logits) - masked).max()) <= 1e-5, buckets


@pytest.mark.parametrize("threshold,kept", [(-np.inf, 64), (np.inf, 0)], ids=["all", "none"])
def test_infinite_thresholds_keep_every_token_or_the_class_token_alone(threshold, kept):
    model, variables = _model()
    gate = {"thresholds": np.full(len(POINTS), threshold, np.float32)}
    variables = {"params": {**variables["params"], "token_gate": gate}}
    images = random_images(model.arch, 3, 5)
    logits, counts = tokens.predict(model, variables, images)
    np.testing.assert_array_equal(np.asarray(counts), kept)
    assert float(np.abs(np.asarray(logits) - _masked(model, variables, images)).max()) <= 1e-5


def _custom_calls(text: str) -> list[str]:
    return re.findall(r"custom_call\s*@([\w.]+)", text)


def test_the_program_has_a_conditional_and_no_host_callback():
    model, variables = _model()
    for batch in (1, 2):
        images = random_images(model.arch, batch, 0)
        text = jax.jit(tokens.dropping(model)).lower(variables, images).as_text()
        assert text.count("stablehlo.case") == len(POINTS)  # one switch per point
        calls = _custom_calls(text)
        assert not [c for c in calls if "callback" in c.lower() or "host" in c.lower()], calls
        assert "callback" not in text.lower()
    # Batch 1 is bound by kernel launches: the bucket is picked without a loop (a binary search
    # is a while loop of launches) and the prefix tokens are set without a scatter. A batch
    # runs its parts in one loop per point.
    assert text.count("stablehlo.while") == len(POINTS)
    one = jax.jit(tokens.dropping(model)).lower(variables, images[:1]).as_text()
    assert "stablehlo.while" not in one and "scatter" not in one, "a loop or scatter is back"
    # The check sees a host callback where there is one.

    def with_callback(x):
        jax.debug.callback(lambda v: None, x)
        return x

    shown = jax.jit(with_callback).lower(np.ones(2, np.float32)).as_text()
    assert any("callback" in c.lower() for c in _custom_calls(shown))


def test_artifact_holds_the_dropping_forward_at_any_batch():
    model, variables = _model()
    arch, params = model.arch, variables["params"]
    exported = jax.export.deserialize(bytearray(artifact.serialize(arch, params)))
    assert not isinstance(exported.in_avals[0].shape[0], int)  # the batch stays symbolic
    text = exported.mlir_module()
    assert "stablehlo.case" in text and "callback" not in text.lower()
    assert "stablehlo.while" in text  # the batch in parts
    call = jax.jit(exported.call)
    for batch in (1, 5):
        images = random_images(arch, batch, 3)
        logits = np.asarray(call(images))
        dropped, _ = tokens.predict(model, variables, images)
        assert float(np.abs(logits - np.asarray(dropped)).max()) <= 1e-5
        assert float(np.abs(logits - _masked(model, variables, images)).max()) <= 1e-5


def test_an_export_with_tokens_runs_them_dropped_on_every_load_path(tmp_path):
    """load_pruned's dropping forward, `amap_jax.predict`'s forward and the jax-only loader
    give the same logits at batch 1 and 5."""
    model, variables = _model()
    arch = model.arch.replace(token_buckets=(16, 32, 48, 65))
    export = str(tmp_path / "export")
    pruned.save_pruned(export, arch, variables["params"])
    pruned.add_artifact(export)
    loaded, loaded_vars = pruned.load_pruned(export)
    assert loaded.arch.token_buckets == (16, 32, 48, 65)
    assert loaded.arch.token_groups == tokens.GROUPS
    spec = importlib.util.spec_from_file_location(
        "run_exported", os.path.join(ROOT, "scripts", "run_exported.py")
    )
    run_exported = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_exported)
    jax_alone = run_exported.load(export)
    forward = pruned.forward(export)
    for batch in (1, 5):
        images = random_images(arch, batch, 4)
        dropped, _ = tokens.predict(loaded, loaded_vars, images)
        masked = _masked(model, variables, images)
        for logits in (jax_alone(images), forward(images)):
            assert float(np.abs(np.asarray(logits) - np.asarray(dropped)).max()) <= 1e-5
            assert float(np.abs(np.asarray(logits) - masked).max()) <= 1e-5


def _mini4():
    return vit_arch("mini", in_chans=1, num_classes=10, pattern="SSSS", image_size=40, patch_size=4)


@pytest.mark.parametrize(
    "method",
    [
        AsVit(target=0.7, buckets=(8, 16)),
        AmapAsVit(target=0.7, asvit=AsVit(target=0.7, buckets=(8, 16))),
    ],
    ids=["asvit", "amap+asvit"],
)
def test_buckets_that_cannot_hold_every_count_are_one_line(method):
    with pytest.raises(methods.SettingError) as e:
        method.check(_mini4())
    assert str(e.value) == (
        "asvit.buckets (8, 16) cannot hold all 101 tokens of a ViT-mini/4 image: add 101"
    )
    with pytest.raises(ValueError, match="cannot hold all 101 tokens") as e:
        tokens.check_buckets(_mini4(), (8, 16))
    assert "\n" not in str(e.value)


def test_non_positive_buckets_are_refused_on_construction():
    with pytest.raises(methods.SettingError, match=r"asvit.buckets \(0, 101\) must be positive"):
        AsVit(buckets=(0, 101))
    with pytest.raises(methods.SettingError, match=r"asvit.groups must be >= 0 \(0: measured\)"):
        AsVit(groups=-1)


def test_default_buckets_are_multiples_of_8_and_the_full_count():
    arch = _mini4()
    assert tokens.default_buckets(arch) == (*range(8, 101, 8), 101)
    assert tokens.default_buckets(vit_arch("S"))[-2:] == (192, 197)
    assert len(tokens.default_buckets(vit_arch("S"))) == 25
    assert tokens.buckets_of(arch) == tokens.default_buckets(arch)  # no token_buckets: default
    assert AsVit().token_buckets(arch) == tokens.default_buckets(arch)
    # Sorted, repeats gone, anything above the full count is the full count.
    assert AsVit(buckets=(64, 16, 16, 500)).token_buckets(arch) == (16, 64, 101)
    assert tokens.buckets_of(arch.replace(token_buckets=(50, 101))) == (50, 101)


def test_export_carries_the_buckets():
    arch = vit_arch("mini", in_chans=1, num_classes=10, pattern="SSSS")  # 17 tokens
    params = random_params(param_shapes(models.build(arch))["params"], 0)
    for buckets, expected in [((), (8, 16, 17)), ((9, 17), (9, 17))]:
        method = AsVit(target=0.6, buckets=buckets)
        variables = method.initialize(arch, params, calibration=None, seed=0)
        p_arch, _ = method.export(arch, variables)
        assert p_arch.token_points == (1, 2, 3) and p_arch.token_buckets == expected


def test_token_buckets_round_trip_through_json():
    arch = _arch().replace(token_buckets=(16, 32, 65))
    back = ViTArch.from_json(arch.to_json())
    assert back == arch and isinstance(back.token_buckets, tuple)
    old = arch.to_dict()  # written before the field existed
    del old["token_buckets"]
    assert arch_from_dict(old).token_buckets == ()
