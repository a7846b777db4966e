"""Zero-padded exports: the same logits, widths at the multiple, the measured choice cached."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import param_shapes, random_images, random_params

from amap_jax import export_speed, models
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


def test_per_layer_multiples_are_measured_once_per_shape_then_cached(tmp_path, monkeypatch):
    base = _odd(vit_arch("micro", pattern="SS"), 1)
    arch = base.replace(blocks=(base.blocks[0],) * 2)  # two blocks of one shape
    cache = str(tmp_path / "padding.json")
    timed = []
    real = export_speed._layer

    def counting(arch, block, geometry, part, batch):
        timed.append(part)
        return real(arch, block, geometry, part, batch)

    monkeypatch.setattr(export_speed, "_layer", counting)
    pairs, speeds = export_speed.fastest_multiples(
        arch, 4, candidates=(1, 8), seconds=0.02, rounds=1, cache=cache
    )
    assert sorted(timed) == ["attention"] * 2 + ["mlp"] * 2  # one shape each, two candidates
    assert len(speeds) == 2 and len(pairs) == 2 and pairs[0] == pairs[1]
    for shape in speeds.values():
        rates = shape["images_per_s"]
        assert shape["multiple"] == max(rates, key=rates.get) and all(v > 0 for v in rates.values())
    timed.clear()
    again = export_speed.fastest_multiples(arch, 4, candidates=(1, 8), cache=cache)
    assert timed == [] and again[0] == pairs
    monkeypatch.setattr(export_speed, "_layers_digest", lambda: "changed layer code")
    export_speed.fastest_multiples(arch, 4, candidates=(1, 8), seconds=0.02, rounds=1, cache=cache)
    assert sorted(timed) == ["attention"] * 2 + ["mlp"] * 2  # stale timings measured again
    timed.clear()
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_fast")
    export_speed.fastest_multiples(arch, 4, candidates=(1, 8), seconds=0.02, rounds=1, cache=cache)
    assert sorted(timed) == ["attention"] * 2 + ["mlp"] * 2  # other compiler flags: again
    with pytest.raises(ValueError, match="3 padding multiples for 2 blocks"):
        padding.pad(arch, {}, [(1, 1)] * 3)
    with pytest.raises(ValueError, match=">= 1"):
        padding.pad(arch, {}, 0)


@pytest.mark.parametrize(
    "gains, choice",
    [
        ({"x8": 1.1, "per layer": 1.2}, "per layer"),
        ({"x8": 1.3, "per layer": 1.2}, "x8"),
        ({"x8": 0.95, "per layer": 0.9}, None),
    ],
)
def test_measured_pads_to_the_fastest_whole_model_if_faster_than_unpadded(
    tmp_path, monkeypatch, gains, choice
):
    arch = _odd(vit_arch("micro", pattern="SS"), 2)
    params = random_params(param_shapes(models.build(arch))["params"], 2)
    pairs = [(8, 1)] * len(arch.blocks)
    monkeypatch.setattr(export_speed, "fastest_multiples", lambda *a, **k: (pairs, {}))
    rounds = []

    def timed(fns, seconds, n, batch):  # each option `gains` times the unpadded rate, each round
        rounds.append(sorted(fns))
        return {"unpadded": [100.0] * n, **{k: [100.0 * g] * n for k, g in gains.items()}}

    monkeypatch.setattr("amap_jax.timing.interleaved", timed)
    cache = str(tmp_path / "padding.json")
    got, report = export_speed.measured(arch, params, 4, candidates=(1, 8), rounds=2, cache=cache)
    assert rounds == [["per layer", "unpadded", "x8"]]
    assert report["gains"] == pytest.approx(gains)
    assert got == {"per layer": pairs, "x8": 8, None: 1}[choice]
    assert report["choice"] == (choice or "unpadded")
    again = export_speed.measured(arch, params, 4, candidates=(1, 8), cache=cache)
    assert again[0] == got and len(rounds) == 1  # cached


def test_measured_does_not_time_per_layer_twice_when_it_is_one_multiple(monkeypatch):
    arch = _odd(vit_arch("micro", pattern="SS"), 2)
    params = random_params(param_shapes(models.build(arch))["params"], 2)
    monkeypatch.setattr(
        export_speed, "fastest_multiples", lambda *a, **k: ([(8, 8)] * len(arch.blocks), {})
    )
    seen = []
    monkeypatch.setattr(
        "amap_jax.timing.interleaved",
        lambda fns, s, n, b: seen.append(sorted(fns)) or {k: [1.0] * n for k in fns},
    )
    assert export_speed.measured(arch, params, 4, candidates=(1, 8, 16), cache=None)[0] == 1
    assert seen == [["unpadded", "x16", "x8"]]
