"""Adaptive token pruning (AS-ViT) and AMAP + AS-ViT: masks, dropping, buckets, budget, export."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import calibration_of, param_shapes, random_images, random_params, tiny_config

from amap_jax import methods, models, pipeline
from amap_jax.methods import asvit
from amap_jax.methods.amap_asvit import AmapAsVit
from amap_jax.methods.asvit import THRESHOLDS, AsVit
from amap_jax.models import tokens
from amap_jax.models.arch import swin_arch, vit_arch
from amap_jax.models.attention import Attention
from amap_jax.pruning import macs
from amap_jax.train import steps
from bench import kept_tokens

ARCH = vit_arch("mini", in_chans=1, num_classes=10, pattern="SSSS")  # 17 tokens, points 1, 2, 3


@functools.cache
def _setup(threshold=0.9, seed=0):
    method = AsVit(target=0.6, threshold_init=threshold)
    params = random_params(param_shapes(models.build(ARCH))["params"], seed)
    variables = method.initialize(ARCH, params, calibration=None, seed=seed)
    return method, variables


def _masked(method, variables, images):
    logits, reports = jax.jit(
        lambda v, x: models.build(ARCH, sites=method).apply(v, x, mutable=[tokens.REPORTS])
    )(variables, images)
    return logits, reports[tokens.REPORTS]["token_gate"]["keep"]


def test_default_points_follow_deit_and_come_after_linear_blocks():
    assert asvit.default_points(vit_arch("S")) == (4, 7, 10)
    assert AsVit().token_points(ARCH) == (1, 2, 3)
    flatten = vit_arch("mini", in_chans=1, num_classes=10, pattern="LLSS")
    assert AsVit().token_points(flatten) == (2, 3)


@pytest.mark.parametrize(
    "arch,points,match",
    [
        (ARCH, (0, 2), r"points \(0, 2\) must be increasing block indices in \[1, 4\)"),
        (ARCH, (2, 2), "must be increasing"),
        (ARCH, (5,), "must be increasing"),
        (
            vit_arch("mini", in_chans=1, num_classes=10, pattern="LLSS"),
            (1, 3),
            "point 1 comes before linear block 1",
        ),
        (swin_arch("micro", num_classes=10), (), "token pruning needs a class token"),
    ],
)
def test_bad_pruning_point_is_one_line(arch, points, match):
    with pytest.raises(methods.SettingError, match=match) as e:
        AsVit(points=points, target=0.9).check(arch)
    assert "\n" not in str(e.value)


def test_all_ones_key_mask_equals_the_unmasked_attention():
    block = ARCH.blocks[0]
    attn = Attention(block, ARCH.geometry()[0])
    x = np.random.default_rng(0).standard_normal((2, ARCH.num_tokens, ARCH.embed_dim))
    x = x.astype(np.float32)
    params = random_params(param_shapes(attn, x)["params"], 1)
    plain = attn.apply({"params": params}, x)
    masked = attn.apply({"params": params}, x, key_mask=jnp.ones((2, ARCH.num_tokens)))
    np.testing.assert_allclose(np.asarray(masked), np.asarray(plain), rtol=1e-6, atol=1e-6)


def test_head_norms_are_each_heads_output_after_the_projection():
    """head_weight="residual": the scores' head norms (a Gram matrix per head) equal the norm
    of what one head adds to the residual stream, measured by scaling every other head's value
    channels to 0; a head whose output is 0 gets norm 0 and a finite gradient."""
    block = ARCH.blocks[0]
    attn = Attention(block, ARCH.geometry()[0], head_weight="residual")
    x = np.random.default_rng(0).standard_normal((2, ARCH.num_tokens, ARCH.embed_dim))
    x = x.astype(np.float32)
    params = {"params": random_params(param_shapes(attn, x)["params"], 1)}
    heads, dv = block.heads, block.v_dim
    v_scale = np.ones(heads * dv, np.float32)
    v_scale[:dv] = 0.0  # head 0 silenced
    _, (_, norms) = attn.apply(params, x, v_scale=v_scale, stats=True)
    bias = attn.apply(params, x, v_scale=np.zeros(heads * dv, np.float32))
    for h in range(1, heads):
        alone = np.zeros(heads * dv, np.float32)
        alone[h * dv : (h + 1) * dv] = 1.0
        added = attn.apply(params, x, v_scale=alone) - bias
        np.testing.assert_allclose(
            np.asarray(norms[:, h]), np.linalg.norm(np.asarray(added), axis=-1), rtol=1e-5
        )
    assert np.all(np.asarray(norms[:, 0]) < 1e-9)

    def total(x):
        return jnp.sum(attn.apply(params, x, v_scale=v_scale, stats=True)[1][1])

    assert np.all(np.isfinite(np.asarray(jax.grad(total)(x))))


def test_head_weight_by_default_is_each_heads_attention_output_before_the_projection():
    """The default head weight is AS-ViT's official one, ||(A_h V_h)_j||: with an identity
    projection (no bias) the attention's output is A V itself, so each head's slice of it
    gives the norm; a value channel scaled (reweight) still counts, a removed one (0) does
    not, as in the export where the scale sits in the projection and the channel is gone."""
    block = ARCH.blocks[0]
    attn = Attention(block, ARCH.geometry()[0])
    assert attn.head_weight == "value"
    x = np.random.default_rng(0).standard_normal((2, ARCH.num_tokens, ARCH.embed_dim))
    x = x.astype(np.float32)
    params = random_params(param_shapes(attn, x)["params"], 1)
    heads, dv = block.heads, block.v_dim
    assert heads * dv == ARCH.embed_dim
    params["proj"] = {"kernel": np.eye(heads * dv, dtype=np.float32), "bias": np.zeros(heads * dv)}
    keep = np.ones(heads * dv, np.float32)
    keep[3] = 0.0  # one value channel of head 0 removed
    av = np.asarray(attn.apply({"params": params}, x, v_scale=keep))  # A V, channel 3 at 0
    want = np.linalg.norm(av.reshape(2, -1, heads, dv), axis=-1).transpose(0, 2, 1)
    _, (_, norms) = attn.apply({"params": params}, x, v_scale=keep * 1.7, stats=True)
    np.testing.assert_allclose(np.asarray(norms), want, rtol=1e-5)


def test_token_exports_made_before_the_head_weight_setting_keep_theirs():
    arch = ARCH.replace(token_points=(1,))
    old = arch.to_dict()
    del old["token_head_weight"]
    assert type(arch).from_dict(old).token_head_weight == "residual"
    assert type(arch).from_dict(arch.to_dict()).token_head_weight == "value"


def test_ste_gradient_reaches_every_threshold():
    method, variables = _setup()
    images = random_images(ARCH, 4, 0)
    model = models.build(ARCH, sites=method)

    def loss(th):
        _, rep = model.apply({**variables, THRESHOLDS: th}, images, mutable=[tokens.REPORTS])
        return asvit.expected_ratio(ARCH, (1, 2, 3), rep[tokens.REPORTS]["token_gate"]["keep"])

    grads = jax.grad(loss)(variables[THRESHOLDS])
    for k, g in grads["token_gate"].items():
        assert np.isfinite(g) and float(g) < 0, k  # a higher threshold keeps fewer tokens


def test_batch1_dropping_equals_the_masked_forward():
    method, variables = _setup()
    images = random_images(ARCH, 6, 2)
    masked, keeps = _masked(method, variables, images)
    small_arch, small_params = method.export(ARCH, variables)
    assert small_arch.token_points == (1, 2, 3)
    model = models.build(small_arch)
    counts = []
    for i in range(len(images)):
        logits, kept = tokens.predict(model, {"params": small_params}, images[i : i + 1])
        assert float(jnp.max(jnp.abs(logits - masked[i : i + 1]))) <= 1e-5
        counts.append(kept[0])
    counts = np.stack(counts)
    np.testing.assert_array_equal(counts, np.stack([np.asarray(k).sum(-1) - 1 for k in keeps], -1))
    assert counts.min() < counts.max() < 16  # images keep different numbers, and not all
    # The exported model's own forward (masks, nothing dropped) is the masked model too.
    np.testing.assert_allclose(model.apply({"params": small_params}, images), masked, atol=1e-5)


@pytest.mark.parametrize("multiple", [1, 4, 8, 32])
def test_buckets_give_each_image_its_batch1_prediction(multiple):
    method, variables = _setup()
    images = random_images(ARCH, 6, 2)
    small_arch, small_params = method.export(ARCH, variables)
    model = models.build(small_arch)
    batched, counts = tokens.predict(model, {"params": small_params}, images, multiple=multiple)
    for i in range(len(images)):
        alone, own = tokens.predict(model, {"params": small_params}, images[i : i + 1])
        np.testing.assert_array_equal(counts[i], own[0])
        assert float(jnp.max(jnp.abs(batched[i] - alone[0]))) <= 1e-5
        assert int(jnp.argmax(batched[i])) == int(jnp.argmax(alone[0]))


def test_budget_loss_drives_the_mean_macs_to_the_target():
    """Only the thresholds train (weights frozen): the budget alone moves the kept MACs."""
    method = AsVit(target=0.6, threshold_init=0.2, threshold_lr=0.05, budget_weight=5.0)
    params = random_params(param_shapes(models.build(ARCH))["params"], 3)
    variables = method.initialize(ARCH, params, calibration=None, seed=0)
    tx = steps.per_collection({"params": optax.set_to_zero(), **method.optimizers(100)})
    state = steps.create_state({"params": params, THRESHOLDS: variables[THRESHOLDS]}, tx)
    objective = steps.Objective(10, regularizer=method.loss(ARCH))
    step = jax.jit(
        steps.make_train_step(
            models.build(ARCH, sites=method), tx, steps.Input((0.5,), (0.5,), 28), objective, 0
        )
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (32, 28, 28, 1)).astype(np.uint8),
        "label": rng.integers(0, 10, 32).astype(np.int32),
    }
    ratios = []
    for _ in range(80):
        state, metrics = step(state, batch)
        ratios.append(float(metrics["macs_ratio"]))
    assert ratios[0] > 0.9  # at 0.2 almost every token is kept
    assert abs(np.mean(ratios[-10:]) - 0.6) < 0.05


def test_budget_under_pmap_is_the_whole_batch_budget():
    """The budget is |mean MACs - target| over the whole batch: pmap over 8 devices (a slice
    each) takes the same step as jit over the batch, thresholds and weights included."""
    from amap_jax.train import parallel

    method = AsVit(target=0.6, threshold_init=0.7, threshold_lr=0.05, budget_weight=5.0)
    params = random_params(param_shapes(models.build(ARCH))["params"], 4)
    variables = method.initialize(ARCH, params, calibration=None, seed=0)
    tx = steps.per_collection({"params": optax.sgd(0.1), **method.optimizers(100)})
    state = steps.create_state({"params": params, THRESHOLDS: variables[THRESHOLDS]}, tx)
    state = jax.device_get(state)  # host copy: the steps donate what they are given
    objective = steps.Objective(10, regularizer=method.loss(ARCH))
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.integers(0, 255, (32, 28, 28, 1)).astype(np.uint8),
        "label": rng.integers(0, 10, 32).astype(np.int32),
    }
    out = {}
    for mode in ("jit", "pmap"):
        place = parallel.Placement(parallel.make_mesh(8), mode)
        step = place.compile(
            steps.make_train_step(
                models.build(ARCH, sites=method),
                tx,
                steps.Input((0.5,), (0.5,), 28),
                objective,
                0,
                axis_name=place.axis,
            )
        )
        new, metrics = step(place.state(state), place.batch(batch))
        out[mode] = (jax.device_get(place.host(new).trainable), place.metrics(metrics))
    (tj, mj), (tp, mp) = out["jit"], out["pmap"]
    # The devices' slices lie on both sides of the target: a budget per slice would differ.
    x = steps.Input((0.5,), (0.5,), 28)(jnp.asarray(batch["image"]))
    _, keeps = _masked(method, {**variables, "params": params}, x)
    per_slice = [
        float(asvit.expected_ratio(ARCH, (1, 2, 3), [k[i : i + 4] for k in keeps]))
        for i in range(0, 32, 4)
    ]
    assert min(per_slice) < 0.6 < max(per_slice)
    np.testing.assert_allclose(mp["macs_ratio"], mj["macs_ratio"], rtol=1e-6)
    np.testing.assert_allclose(mp["loss"], mj["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), tp, tj)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), tj, state.trainable)
    assert max(jax.tree.leaves(moved[THRESHOLDS])) > 1e-4


@pytest.mark.parametrize("threshold,direction", [(0.1, 1), (3.0, -1)], ids=["up", "down"])
def test_calibration_moves_the_thresholds_either_way_onto_the_target(threshold, direction):
    """Thresholds that keep too many tokens rise; thresholds that drop too many fall: either
    way the mean MACs of the calibration batch land on the target from below."""
    method, variables = _setup(threshold=threshold)
    images = jnp.asarray(random_images(ARCH, 32, 5))
    _, keeps = _masked(method, variables, images)
    before = float(asvit.expected_ratio(ARCH, (1, 2, 3), keeps))
    assert (before - 0.6) * direction > 0.02  # on the wrong side of the target
    final = method.finalize(ARCH, variables, calibration=calibration_of(images))
    _, keeps = _masked(method, final, images)
    ratio = float(asvit.expected_ratio(ARCH, (1, 2, 3), keeps))
    assert 0.58 < ratio <= 0.6
    shifts = [
        float(final[THRESHOLDS]["token_gate"][k] - threshold)
        for k in sorted(final[THRESHOLDS]["token_gate"])
    ]
    assert max(shifts) - min(shifts) < 1e-6 and shifts[0] * direction > 0  # one common shift


def test_recalibration_of_an_export_lands_on_the_target():
    """After fine-tuning the scores move; the exported model's thresholds are shifted so that
    its mean MACs on the calibration batch meet the target again, either way."""
    method, variables = _setup(threshold=0.1)
    images = jnp.asarray(random_images(ARCH, 32, 5))
    small_arch, small_params = method.export(ARCH, variables)
    for start in (0.1, 3.0):
        gate = {"thresholds": np.full(3, start, np.float32)}
        params = {**small_params, "token_gate": gate}
        new = method.recalibrate(ARCH, small_arch, params, calibration_of(images))
        ratio = float(asvit.exported_ratio(ARCH, small_arch, new, images))
        assert 0.58 < ratio <= 0.6, start


def _searched_amap_asvit(target: float, threshold_init: float):
    """(method, calibration images, variables) of AMAP+AS-ViT with indicators as a search
    might leave them: random logits around keep."""
    method = AmapAsVit(
        target=target,
        amap=methods.Amap(target=target, init="constant"),
        asvit=AsVit(target=target, threshold_init=threshold_init),
    )
    params = random_params(param_shapes(models.build(ARCH))["params"], 4)
    images = jnp.asarray(random_images(ARCH, 16, 6))
    variables = method.initialize(ARCH, params, calibration=calibration_of(images), seed=0)
    rng = np.random.default_rng(1)
    variables["indicators"] = jax.tree.map(
        lambda x: rng.normal(1.5, 2.0, x.shape).astype(np.float32), variables["indicators"]
    )
    return method, images, variables


def test_amap_and_asvit_export_channels_and_tokens_exactly():
    method, images, variables = _searched_amap_asvit(0.5, threshold_init=0.8)
    final = method.finalize(ARCH, variables, calibration=calibration_of(images))
    masked, keeps = _masked(method, final, images)
    small_arch, small_params = method.export(ARCH, final)
    assert small_arch.token_points == (1, 2, 3)
    assert all(b.mlp_dim < 256 for b in small_arch.blocks)  # channels pruned too
    model = models.build(small_arch)
    for i in range(3):
        logits, _ = tokens.predict(model, {"params": small_params}, images[i : i + 1])
        assert float(jnp.max(jnp.abs(logits - masked[i : i + 1]))) <= 1e-5
    # One budget counts both: channel widths times the tokens each image keeps.
    kept = [np.asarray(k).sum(-1) for k in keeps]
    per_image = macs.model_macs(small_arch, None, macs.token_counts(ARCH, (1, 2, 3), kept))
    assert np.mean(per_image) / macs.model_macs(ARCH) <= 0.5 + 1e-6


@pytest.mark.parametrize("target, trimmed", [(0.5, False), (0.08, True)])
def test_amap_and_asvit_meet_the_rest_of_the_budget_with_tokens_before_channels(target, trimmed):
    """The search's channel masks stay when one shift of the thresholds meets the target on the
    calibration batch; channels are trimmed only for what the tokens cannot do alone."""
    method, images, variables = _searched_amap_asvit(target, threshold_init=0.0)
    searched = method.channel_widths(ARCH, variables)
    final = method.finalize(ARCH, variables, calibration=calibration_of(images))
    widths = method.channel_widths(ARCH, final)
    assert (widths != searched) == trimmed
    assert np.all(np.asarray(widths) <= np.asarray(searched))
    assert asvit.search_ratio(method, ARCH, final, calibration_of(images)) <= target + 1e-6


def test_macs_of_kept_counts_do_not_overflow_at_deit_s_scale():
    from amap_jax.models.arch import vit_arch

    deit = vit_arch("S", image_size=224)
    dense = macs.model_macs(deit)
    for dtype in (np.int32, np.uint8, np.int64):
        kept = [np.full(3, 137, dtype), np.full(3, 98, dtype), np.full(3, 68, dtype)]
        per_image = macs.model_macs(deit, None, macs.token_counts(deit, (4, 7, 10), kept))
        assert np.all(per_image > 0.3 * dense) and np.all(per_image < dense)
        want = macs.model_macs(deit, None, macs.token_counts(deit, (4, 7, 10), [137, 98, 68]))
        np.testing.assert_allclose(per_image, want)
        direct = macs.model_macs(deit, None, [np.full(3, 197, dtype)] * len(deit.blocks))
        np.testing.assert_allclose(direct, dense)  # token counts passed without token_counts


@pytest.mark.parametrize("method", ["asvit", "amap+asvit"])
def test_token_pruning_runs_end_to_end(tmp_path, method):
    c = tiny_config()
    c.method = method
    c.model.pattern = "SS"
    c.model.patch_size = 2  # 16 patch tokens on 8x8 digits
    c.search.target = 0.8
    summary = pipeline.run(c, str(tmp_path / "w"))
    assert summary["export_max_logit_diff"] <= 1e-5  # masked == exported == batch-1 dropping
    assert summary["masked_top1"] == summary["pruned_before_finetune_top1"]
    # Recalibrated after fine-tuning on training images: the test set lands on the target too.
    b = summary["budget"]
    assert (
        abs(summary["macs_ratio"] - 0.8) <= 0.02
        and b["met"]
        and b["achieved"] == pytest.approx(summary["macs_ratio"], abs=1e-4)
    )
    # the fix-up removes only what the search left above the target
    assert b["search_end"] >= 0.8 - 0.02
    assert b["fixup"] == pytest.approx(max(b["search_end"] - 0.8, 0.0), abs=0.01)
    p = summary["pruned"]
    assert 0 < p["kept_tokens_mean"][0] <= 16 and p["images_per_s_batch1"] > 0
    if method == "asvit":  # tokens alone must meet the target (with channels they may not)
        assert p["kept_tokens_mean"][0] < 16
    # batch 1 timed interleaved with the dense model; the ratio is of the two speeds reported
    b1 = p["images_per_s_batch1"] / summary["dense"]["images_per_s_batch1"]
    assert summary["speedup_batch1"] == pytest.approx(b1, rel=2e-3)
    # bench/kept_tokens.py reads the same keep decisions back from the export
    arch, masks, shown, labels, logits = kept_tokens.collect(str(tmp_path / "w"), 4)
    # asvit.groups 0: the export measured the parts a batch runs in
    assert arch.token_groups == p["token_groups"] and p["token_groups"] in (1, tokens.GROUPS)
    np.testing.assert_allclose(masks.sum(-1).mean(0), p["kept_tokens_mean"], atol=0.01)
    rows = kept_tokens.summarize(arch, masks)
    assert [r["point"] for r in rows] == list(arch.token_points)
    pngs = kept_tokens.plot(arch, masks, shown, labels, logits, rows, str(tmp_path))
    assert len(shown) == 4 and all(os.path.getsize(f) > 0 for f in pngs)
