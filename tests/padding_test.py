"""Zero-padded exports: the same logits, widths at the multiple, the measured choice cached."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import param_shapes, random_images, random_params

from amap_jax import models
from amap_jax.models.arch import LINEAR, swin_arch, vit_arch
from amap_jax.pruning import macs, padding


def _gathered(rng, dim: int) -> tuple[int, ...]:
    return tuple(sorted(rng.choice(dim, dim - 5, replace=False).tolist()))


def _odd(arch, seed):
    """`arch` with odd per-head widths and gathered inputs in every block, as export leaves."""
    rng = np.random.default_rng(seed)
    blocks = []
    for b, g in zip(arch.blocks, arch.geometry(), strict=True):
        blocks.append(
            dataclasses.replace(
                b,
                qk_dim=b.qk_dim - 3,
                v_dim=b.v_dim - 1,
                mlp_dim=b.mlp_dim - 7,
                qk_scale=b.scale,
                dwc_per_head=b.attn == LINEAR and bool(rng.integers(2)),
                attn_in=_gathered(rng, g.dim),
                mlp_in=_gathered(rng, g.dim),
            )
        )
    return arch.replace(blocks=tuple(blocks))


ARCHS = {
    "vit softmax": lambda: vit_arch("micro", pattern="SS"),
    "flatten": lambda: vit_arch("micro", pattern="LS"),
    "swin": lambda: swin_arch("micro", pattern="LLSS"),
}


@pytest.mark.parametrize("multiple", [8, 16, "per block"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_padded_model_gives_the_same_logits(name, multiple):
    arch = _odd(ARCHS[name](), seed=len(str(multiple)))
    params = random_params(param_shapes(models.build(arch))["params"], seed=len(str(multiple)))
    if multiple == "per block":  # attention and MLP of each block at their own multiple
        multiple = [((1, 8), (16, 1), (8, 32), (4, 4))[i % 4] for i in range(len(arch.blocks))]
    images = random_images(arch, 2, seed=0)
    want = jax.jit(models.build(arch).apply)({"params": params}, images)

    big, big_params = padding.pad(arch, params, multiple)
    got = jax.jit(models.build(big).apply)({"params": big_params}, images)
    assert np.abs(np.asarray(want)).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert jax.tree.map(np.shape, big_params) == jax.tree.map(
        lambda s: s.shape, param_shapes(models.build(big))["params"]
    )
    for b, (attn_m, mlp_m) in zip(big.blocks, padding.per_block(arch, multiple), strict=True):
        assert b.qk_dim % attn_m == 0 and b.v_dim % attn_m == 0 and b.mlp_dim % mlp_m == 0
        assert b.attn_in == () or len(b.attn_in) % attn_m == 0
        assert b.mlp_in == () or len(b.mlp_in) % mlp_m == 0
    assert macs.model_macs(big) > macs.model_macs(arch)  # the pads are counted


def test_multiple_one_changes_nothing():
    arch = _odd(vit_arch("micro", pattern="SS"), 0)
    params = random_params(param_shapes(models.build(arch))["params"], 0)
    same, same_params = padding.pad(arch, params, 1)
    assert same == arch
    jax.tree.map(np.testing.assert_array_equal, same_params, params)


def test_fastest_multiple_is_measured_once_then_cached(tmp_path, monkeypatch):
    arch = _odd(vit_arch("micro", pattern="SS"), 1)
    params = random_params(param_shapes(models.build(arch))["params"], 1)
    cache = str(tmp_path / "padding.json")
    best, speeds = padding.fastest_multiple(
        arch, params, 4, candidates=(1, 8), seconds=0.05, rounds=1, cache=cache
    )
    assert set(speeds) == {1, 8} and best == max(speeds, key=speeds.get)
    assert all(s > 0 for s in speeds.values())

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr("amap_jax.train.evaluate.interleaved", no_measuring)
    assert padding.fastest_multiple(arch, params, 4, candidates=(1, 8), cache=cache) == (
        best,
        speeds,
    )


def test_per_layer_multiples_are_measured_once_per_shape_then_cached(tmp_path, monkeypatch):
    base = _odd(vit_arch("micro", pattern="SS"), 1)
    arch = base.replace(blocks=(base.blocks[0],) * 2)  # two blocks of one shape
    cache = str(tmp_path / "padding.json")
    timed = []
    real = padding._layer

    def counting(arch, block, geometry, part, batch):
        timed.append(part)
        return real(arch, block, geometry, part, batch)

    monkeypatch.setattr(padding, "_layer", counting)
    pairs, speeds = padding.fastest_multiples(
        arch, 4, candidates=(1, 8), seconds=0.02, rounds=1, cache=cache
    )
    assert sorted(timed) == ["attention"] * 2 + ["mlp"] * 2  # one shape each, two candidates
    assert len(speeds) == 2 and len(pairs) == 2 and pairs[0] == pairs[1]
    for shape in speeds.values():
        rates = shape["images_per_s"]
        assert shape["multiple"] == max(rates, key=rates.get) and all(v > 0 for v in rates.values())
    timed.clear()
    again = padding.fastest_multiples(arch, 4, candidates=(1, 8), cache=cache)
    assert timed == [] and again[0] == pairs
    with pytest.raises(ValueError, match="3 padding multiples for 2 blocks"):
        padding.pad(arch, {}, [(1, 1)] * 3)
    with pytest.raises(ValueError, match=">= 1"):
        padding.pad(arch, {}, 0)


@pytest.mark.parametrize("gain, kept", [(1.2, True), (0.9, False)])
def test_measured_keeps_the_per_layer_choice_only_if_the_whole_model_gains(
    tmp_path, monkeypatch, gain, kept
):
    arch = _odd(vit_arch("micro", pattern="SS"), 2)
    params = random_params(param_shapes(models.build(arch))["params"], 2)
    pairs = [(8, 1)] * len(arch.blocks)
    monkeypatch.setattr(padding, "fastest_multiples", lambda *a, **k: (pairs, {}))
    rounds = []

    def timed(fns, seconds, n, batch):  # per layer `gain` times the unpadded rate, every round
        rounds.append(sorted(fns))
        return {"unpadded": [100.0] * n, "per layer": [100.0 * gain] * n}

    monkeypatch.setattr("amap_jax.train.evaluate.interleaved", timed)
    cache = str(tmp_path / "padding.json")
    choice, report = padding.measured(arch, params, 4, rounds=2, cache=cache)
    assert rounds == [["per layer", "unpadded"]] and report["gain"] == pytest.approx(gain)
    assert choice == (pairs if kept else 1)
    assert padding.measured(arch, params, 4, cache=cache)[0] == choice and len(rounds) == 1
