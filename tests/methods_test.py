"""The method interface: VTP and the baselines as methods, generic export over every site, MACs with
input-dimension pruning and padded heads, and the config checks of each method's section."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import calibration_of, count_params, param_shapes, random_images, random_params

from amap_jax import config as config_lib
from amap_jax import methods, models
from amap_jax.io import pruned
from amap_jax.methods import baselines, vtp
from amap_jax.methods.amap import Amap
from amap_jax.methods.vtp import SCORES, Vtp
from amap_jax.models.arch import LINEAR, swin_arch, vit_arch
from amap_jax.pruning import export, macs


def _vit(pattern="LS"):
    return vit_arch("micro", in_chans=1, num_classes=10, pattern=pattern)


@functools.cache
def _apply(arch, method=None):
    return jax.jit(models.build(arch, sites=method).apply)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _calibration(arch):
    return calibration_of(random_images(arch, 64, 7))


def _vtp_case(arch, seed, method=None):
    """VTP variables with spread-out random scores (some negative), then finalized."""
    method = method or Vtp(target=0.6)
    params = random_params(param_shapes(models.build(arch))["params"], seed)
    variables = method.initialize(arch, params, calibration=_calibration(arch), seed=seed)
    rng = np.random.default_rng(seed)
    variables[SCORES] = jax.tree.map(
        lambda x: rng.normal(0.8, 0.6, x.shape).astype(np.float32), variables[SCORES]
    )
    return method, variables, method.finalize(arch, variables)


# ----------------------------------------------------------------------------------------------
# VTP: masked (scored) model == exported model


VTP_CASES = [
    ("vit-softmax", lambda: _vit("SS"), 0),
    ("vit-linear", lambda: _vit("LL"), 1),
    ("swin-flatten", lambda: swin_arch("micro", num_classes=10, pattern="LLSS"), 2),
    ("swin", lambda: swin_arch("micro", num_classes=10, pattern="SSSS"), 3),
]


@pytest.mark.parametrize("fold", [False, True], ids=["binarised", "folded"])
@pytest.mark.parametrize("name,make,seed", VTP_CASES, ids=[c[0] for c in VTP_CASES])
def test_vtp_masked_equals_exported(name, make, seed, fold):
    arch = make()
    method, _, final = _vtp_case(arch, seed, Vtp(target=0.6, fold_scores=fold))
    kept = np.concatenate([np.ravel(x) for x in jax.tree.leaves(final[SCORES])])
    assert np.all(kept[kept != 0] == 1) != fold  # the paper's rule: kept scores become 1
    images = random_images(arch, 2, seed)
    masked = _apply(arch, method)(final, images)
    small_arch, small_params = method.export(arch, final)
    exported = _apply(small_arch)({"params": small_params}, images)
    assert np.abs(np.asarray(masked)).max() > 0.1
    assert _max_diff(masked, exported) <= 1e-5
    # The scores matter: with every pruned score restored the logits differ.
    assert _max_diff(masked, _apply(arch, method)({**final, SCORES: _ones(final)}, images)) > 1e-3
    # Input dimensions are gathered, value channels padded to the widest head, MACs meet target.
    assert any(b.attn_in for b in small_arch.blocks) and any(b.mlp_in for b in small_arch.blocks)
    v = [np.asarray(final[SCORES][f"block_{i}"]["v"]) != 0 for i in range(len(arch.blocks))]
    assert any(m.sum(1).min() < m.sum(1).max() for m in v)  # heads keep different counts
    for b, m in zip(small_arch.blocks, v, strict=True):
        assert b.v_dim == m.sum(1).max()
    assert macs.ratio(arch, small_arch) <= 0.6
    want = jax.tree.map(lambda s: s.shape, param_shapes(models.build(small_arch))["params"])
    assert jax.tree.map(np.shape, small_params) == want
    if name == "vit-linear":  # per-head depthwise kernels where heads keep different v rows
        assert any(b.dwc_per_head for b in small_arch.blocks if b.attn == LINEAR)


def _ones(variables):
    return jax.tree.map(lambda x: np.ones_like(x), variables[SCORES])


def test_vtp_binarised_export_is_the_searched_model_with_kept_scores_set_to_one():
    """The paper's rule, written out: the threshold's survivors at 1, the rest at 0."""
    arch = _vit("LS")
    _, variables, folded = _vtp_case(arch, 8, Vtp(target=0.6, fold_scores=True))
    ones = {**folded, SCORES: jax.tree.map(lambda x: (x != 0).astype(np.float32), folded[SCORES])}
    method = Vtp(target=0.6)
    binarised = method.finalize(arch, variables)
    images = random_images(arch, 3, 8)
    small_arch, small_params = method.export(arch, binarised)
    exported = _apply(small_arch)({"params": small_params}, images)
    assert _max_diff(_apply(arch, method)(ones, images), exported) <= 1e-5
    # and it is not the folded model: the kept scores' values mattered
    f_arch, f_params = Vtp(target=0.6, fold_scores=True).export(arch, folded)
    assert (
        f_arch == small_arch
        and _max_diff(_apply(f_arch)({"params": f_params}, images), exported) > 1e-3
    )


def test_vtp_report_holds_the_score_histogram():
    arch = _vit("LS")
    method, variables, _ = _vtp_case(arch, 9)
    report = method.report(arch, variables)
    hist = report["score_histogram"]
    assert sum(hist["counts"]) == _count(variables) and len(hist["edges"]) == 31
    assert report["score_quantiles"]["5%"] <= report["score_quantiles"]["95%"]


def test_vtp_reexport_of_an_export_is_identity():
    arch = _vit("LS")
    method, _, final = _vtp_case(arch, 4)
    small_arch, small_params = method.export(arch, final)
    scores = method.initialize(small_arch, small_params, calibration=None, seed=0)[SCORES]
    again_arch, again_params = method.export(small_arch, {"params": small_params, SCORES: scores})
    assert again_arch == small_arch
    jax.tree.map(np.testing.assert_array_equal, again_params, small_params)


def test_vtp_rate_rule_prunes_the_requested_share_below_one_threshold():
    arch = _vit("LS")
    method, variables, final = _vtp_case(arch, 5, Vtp(rule="rate", rate=0.3, fold_scores=True))
    before = np.concatenate([np.abs(x).reshape(-1) for x in jax.tree.leaves(variables[SCORES])])
    after = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(final[SCORES])])
    pruned_mask = after == 0
    assert pruned_mask.sum() == round(0.3 * before.size)
    # One global threshold: every pruned |score| is below every kept one.
    assert before[pruned_mask].max() <= before[~pruned_mask].min()
    assert vtp.threshold(final) == pytest.approx(before[~pruned_mask].min())
    kept = after[~pruned_mask]
    np.testing.assert_array_equal(np.abs(kept), before[~pruned_mask])  # kept scores unchanged


def test_vtp_target_rule_is_the_smallest_cut_that_meets_the_target():
    arch = _vit("LS")
    method, variables, final = _vtp_case(arch, 6, Vtp(target=0.55))
    small = method.pruned_arch(arch, final)
    assert macs.ratio(arch, small) <= 0.55
    n = sum(int((np.asarray(x) == 0).sum()) for x in jax.tree.leaves(final[SCORES]))
    one_fewer = Vtp(rule="rate", rate=(n - 1) / _count(variables))
    assert macs.ratio(arch, one_fewer.pruned_arch(arch, one_fewer.finalize(arch, variables))) > 0.55


def _count(variables):
    return sum(np.size(x) for x in jax.tree.leaves(variables[SCORES]))


def test_vtp_l1_loss_is_the_sum_of_absolute_scores():
    arch = _vit("LS")
    method, variables, _ = _vtp_case(arch, 7, Vtp(l1_weight=0.01))
    loss, metrics = method.loss(arch)({SCORES: variables[SCORES]}, {}, jnp.mean)
    total = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(variables[SCORES]))
    assert float(metrics["l1"]) == pytest.approx(total, rel=1e-5)
    assert float(loss) == pytest.approx(0.01 * total, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Parameter trees: a method-less model is the dense model; methods add only their own


def test_method_less_model_has_exactly_the_dense_parameter_tree():
    arch = _vit("LS")
    dense = param_shapes(models.build(arch))
    assert set(dense) == {"params"}
    assert jax.tree.structure(param_shapes(models.ViT(arch, sites=None))) == jax.tree.structure(
        dense
    )
    assert count_params(dense["params"]) == 21_706  # pinned in models_test
    expected = {"vtp": {SCORES}, "magnitude": {baselines.MASKS}, "random": {baselines.MASKS}}
    for name, collections in expected.items():
        shapes = param_shapes(models.build(arch, sites=methods.get(name)()))
        assert set(shapes) == {"params", *collections}
        assert jax.tree.structure(shapes["params"]) == jax.tree.structure(dense["params"])


def test_amap_reweight_adds_one_scale_per_value_channel_and_hidden_unit():
    arch = _vit("SS")
    dense = param_shapes(models.build(arch))["params"]
    shapes = param_shapes(models.build(arch, sites=Amap()))["params"]
    extra = sum(b.heads * b.v_dim + b.mlp_dim for b in arch.blocks)
    assert count_params(shapes) - count_params(dense) == extra
    for i, b in enumerate(arch.blocks):
        assert shapes[f"block_{i}"]["reweight_v"].shape == (b.heads, b.v_dim)
        assert shapes[f"block_{i}"]["reweight_hidden"].shape == (1, b.mlp_dim)
    no_rw = param_shapes(models.build(arch, sites=Amap(reweight=False)))["params"]
    assert jax.tree.structure(no_rw) == jax.tree.structure(dense)


# ----------------------------------------------------------------------------------------------
# MACs with input-dimension pruning and padded heads


@pytest.mark.parametrize("pattern", [None, "LLLLLLSSSSSS"], ids=["softmax", "flatten"])
def test_closed_form_macs_with_input_pruning_match_xla(pattern):
    arch = vit_arch("S", pattern=pattern, gelu_approximate=True)
    rng = np.random.default_rng(0)
    mults = []
    for b, g in zip(arch.blocks, arch.geometry(), strict=True):
        shapes = models.site_shapes(b, g.dim)
        m = {
            s: (rng.random(shapes[s]) < rng.uniform(0.5, 0.9)).astype(np.float32) for s in vtp.SITES
        }
        for s in m:
            m[s].reshape(-1)[0] = 1.0
        mults.append(m)
    small = export.pruned_arch(arch, mults)
    assert all(b.attn_in and b.mlp_in for b in small.blocks)
    assert macs.ratio(arch, small) < 0.85
    model = models.build(small)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    counted = macs.xla_macs(model.apply, param_shapes(model), images)
    ours = macs.model_macs(small)
    assert ours <= counted
    assert abs(ours / counted - 1) < 0.02, (ours, counted)
    # Padding is counted: the exported v width is the widest head's count.
    for b, m in zip(small.blocks, mults, strict=True):
        assert b.v_dim == m["v"].sum(1).max() and len(b.attn_in) == m["attn_in"].sum()


# ----------------------------------------------------------------------------------------------
# Baselines: magnitude and random, head-balanced, uniform or copied widths


def test_uniform_baseline_widths_meet_the_target_head_balanced():
    arch = _vit("LS")
    for name in ("magnitude", "random"):
        method = methods.get(name)(target=0.5)
        params = random_params(param_shapes(models.build(arch))["params"], 0)
        v = method.initialize(arch, params, calibration=None, seed=0)
        small = method.pruned_arch(arch, v)
        assert 0.4 < macs.ratio(arch, small) <= 0.5
        for i in range(len(arch.blocks)):
            for site, m in v["masks"][f"block_{i}"].items():
                assert len(set(np.asarray(m).sum(1))) == 1, (name, site)  # balanced


@pytest.mark.parametrize("pattern", ["SSSS", "LLSS"])
@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_uniform_baseline_widths_land_on_the_target_as_amap_does(pattern, target):
    """The comparison's configs: within 0.005 of the target (one keep fraction alone gave
    0.280 of ViT-mini4/7 for 0.3), never over it, each group within one channel per head of
    the others' share."""
    arch = vit_arch("mini4", in_chans=1, num_classes=10, pattern=pattern)
    counts = baselines.uniform_widths(arch, baselines.Random(target=target))
    kept = [tuple(k for _, k in c) for c in counts]
    assert target - 0.005 < macs.model_macs(arch, kept) / macs.model_macs(arch) <= target
    sizes = [(b.qk_dim, b.v_dim, b.mlp_dim) for b in arch.blocks]
    shares = [
        k / w for ks, ws in zip(kept, sizes, strict=True) for k, w in zip(ks, ws, strict=True)
    ]
    assert max(shares) - min(shares) <= 2 / 16 + 1e-9


def test_magnitude_keeps_the_largest_l1_channels():
    arch = _vit("SS")
    params = random_params(param_shapes(models.build(arch))["params"], 1)
    method = methods.get("magnitude")(target=0.6)
    masks = method.initialize(arch, params, calibration=None, seed=0)["masks"]
    norms = baselines.channels.magnitude(params["block_0"], arch.blocks[0].heads, ("v",))["v"]
    m = np.asarray(masks["block_0"]["v"]) > 0
    for h in range(m.shape[0]):
        assert np.asarray(norms)[h][m[h]].min() >= np.asarray(norms)[h][~m[h]].max()


def test_random_baseline_depends_on_the_seed_only():
    arch = _vit("SS")
    params = random_params(param_shapes(models.build(arch))["params"], 1)
    method = methods.get("random")(target=0.6)
    a, b, c = (
        method.initialize(arch, params, calibration=None, seed=s)["masks"] for s in (0, 0, 1)
    )
    jax.tree.map(np.testing.assert_array_equal, a, b)
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True)
    assert any(not np.array_equal(x, y) for x, y in leaves)


def test_baseline_widths_copied_from_another_runs_export(tmp_path):
    arch = _vit("LS")
    method, _, final = _vtp_case(arch, 8)
    small_arch, small_params = method.export(arch, final)
    pruned.save_pruned(str(tmp_path / "export"), small_arch, small_params)
    c = config_lib.defaults()
    c.method, c.method_widths_from = "magnitude", str(tmp_path)
    baseline = methods.from_config(c)
    assert baseline.sites == ("qk", "v", "hidden", "attn_in", "mlp_in")
    params = random_params(param_shapes(models.build(arch))["params"], 2)
    v = baseline.initialize(arch, params, calibration=None, seed=0)
    copied = baseline.pruned_arch(arch, v)
    for a, b in zip(copied.blocks, small_arch.blocks, strict=True):
        assert (a.qk_dim, a.v_dim, a.mlp_dim) == (b.qk_dim, b.v_dim, b.mlp_dim)
        assert len(a.attn_in) == len(b.attn_in) and len(a.mlp_in) == len(b.mlp_in)
    assert macs.model_macs(copied) == macs.model_macs(small_arch)
    # A model the export does not fit is one line.
    other = vit_arch("mini", in_chans=1, num_classes=10)
    with pytest.raises(methods.SettingError, match="method_widths_from"):
        baseline.initialize(other, None, calibration=None, seed=0)


# ----------------------------------------------------------------------------------------------
# Config: each method's settings in its own section, checked by the method


def test_bad_method_name_is_one_line():
    c = config_lib.defaults()
    c.method = "vpt"
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    assert str(e.value) == (
        "method must be one of amap, asvit, amap+asvit, magnitude, random, vtp, got 'vpt'"
    )


@pytest.mark.parametrize(
    "section,key,value,home",
    [("search", "similarity", False, "amap"), ("amap", "l1_weight", 0.1, "vtp")],
)
def test_method_setting_in_the_wrong_section_is_one_line(section, key, value, home):
    c = config_lib.defaults()
    c[section][key] = value  # as a config file might
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    assert (
        str(e.value) == f"{section}.{key} is not a setting of {section}; it is a setting of {home}"
    )


@pytest.mark.parametrize(
    "method,key,value,match",
    [
        ("vtp", "rule", "median", "vtp.rule must be 'target' or 'rate'"),
        ("vtp", "rate", 1.5, r"vtp.rate must be in \[0, 1\)"),
        ("amap", "init", "zeros", "amap.init must be 'constant', 'attn_diff' or 'output_diff'"),
        ("amap", "budget_shift", "flops", "amap.budget_shift must be 'uniform' or 'cost'"),
        ("amap", "indicator_moments", "x", "amap.indicator_moments must be 'auto', 'shared' or"),
        ("magnitude", "min_keep", 0, "baseline.min_keep must be >= 1"),
    ],
)
def test_bad_method_setting_is_one_line(method, key, value, match):
    c = config_lib.defaults()
    c.method = method
    c[methods.get(method).section][key] = value
    with pytest.raises(methods.SettingError, match=match):
        config_lib.validate(c)


def test_widths_from_a_run_without_export_is_one_line(tmp_path):
    c = config_lib.defaults()
    c.method, c.method_widths_from = "random", str(tmp_path)
    with pytest.raises(methods.SettingError, match="method_widths_from: .* no finished export"):
        config_lib.validate(c)


def test_every_section_default_is_a_method_setting():
    c = config_lib.defaults()
    for section, cls in methods.sections().items():
        assert set(c[section]) == set(cls.settings())
        assert isinstance(c[section], ml_collections.ConfigDict)
    json.dumps(c.to_dict())  # a workdir's config.json holds every section


def test_a_method_registered_in_one_place_is_selectable_validated_and_recorded(tmp_path):
    """A new method is one class and `@register`: nothing else to edit for the config, its
    checks, the work directory's stage records or the summary."""
    from conftest import tiny_config

    from amap_jax import pipeline

    @dataclasses.dataclass(frozen=True)
    class FirstChannels(baselines.Baseline):
        """Keeps the first channels of every head."""

        name: ClassVar[str] = "first_channels"
        section: ClassVar[str] = "first_channels"

        def scores(self, arch, params, seed):
            return [
                {s: -np.broadcast_to(np.arange(w, dtype=float), (h, w)) for s, (h, w) in
                 models.site_shapes(b, g.dim).items() if s in self.sites}
                for b, g in zip(arch.blocks, arch.geometry(), strict=True)
            ]  # fmt: skip

    methods.register(FirstChannels)
    try:
        c = tiny_config()
        assert "first_channels" in methods.names()
        assert dict(c.first_channels) == {"min_keep": 1, "layer_widths": "uniform"}
        c.method = "first_channels"
        c.first_channels.min_keep = 0
        with pytest.raises(methods.SettingError, match="min_keep must be >= 1"):
            config_lib.validate(c)
        c.first_channels.min_keep = 2
        summary = pipeline.run(c, str(tmp_path / "w"))
        assert summary["method"] == "first_channels"
        assert summary["method_settings"] == {
            "first_channels": {"min_keep": 2, "layer_widths": "uniform"}
        }
        stages = json.loads((tmp_path / "w" / "stages.json").read_text())
        assert stages["search"]["first_channels.min_keep"] == 2
        b = summary["budget"]
        assert b["achieved"] <= 0.6 and b["fixup"] == 0  # its masks were fixed from the start
    finally:
        methods.REGISTRY.pop("first_channels")
