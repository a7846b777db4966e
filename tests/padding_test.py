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


@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("name", list(ARCHS))
def test_padded_model_gives_the_same_logits(name, multiple):
    arch = _odd(ARCHS[name](), seed=multiple)
    params = random_params(param_shapes(models.build(arch))["params"], seed=multiple)
    images = random_images(arch, 2, seed=0)
    want = jax.jit(models.build(arch).apply)({"params": params}, images)

    big, big_params = padding.pad(arch, params, multiple)
    got = jax.jit(models.build(big).apply)({"params": big_params}, images)
    assert np.abs(np.asarray(want)).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert jax.tree.map(np.shape, big_params) == jax.tree.map(
        lambda s: s.shape, param_shapes(models.build(big))["params"]
    )
    for b in big.blocks:
        for width in (b.qk_dim, b.v_dim, b.mlp_dim):
            assert width % multiple == 0
        for idx in (b.attn_in, b.mlp_in):
            assert idx == () or len(idx) % multiple == 0
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

    monkeypatch.setattr("amap_jax.train.evaluate.throughput", no_measuring)
    assert padding.fastest_multiple(arch, params, 4, candidates=(1, 8), cache=cache) == (
        best,
        speeds,
    )
