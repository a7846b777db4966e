"""Hierarchical models: Swin and FLatten-Swin structure, pinned sizes and MACs, and AMAP export
on window-softmax and global-linear blocks."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    all_kept,
    count_params,
    logits_for,
    param_shapes,
    random_images,
    random_masks,
    random_params,
)

from amap_jax import models
from amap_jax.io.pretrained import import_pretrained
from amap_jax.methods.amap import INDICATORS, SIMILARITY, Amap
from amap_jax.models.arch import LINEAR, SOFTMAX, SwinArch, arch_from_dict, swin_arch, vit_arch
from amap_jax.models.attention import relative_position_index, shift_mask
from amap_jax.models.block import from_windows, to_windows
from amap_jax.pruning import macs

AMAP = Amap()

# Parameter counts of the reference implementations: timm's swin_*_patch4_window7_224 and
# deit_base_distilled_patch16_224 (timm 1.0.31), and the official FLatten-Transformer code's
# FLatten-Swin (LeapLabTHU/FLatten-Transformer, models/flatten_swin.py, configs flatten_swin_*).
PARAM_COUNTS = [
    (lambda: swin_arch("T"), 28_288_354),
    (lambda: swin_arch("S"), 49_606_258),
    (lambda: swin_arch("B"), 87_768_224),
    (lambda: swin_arch("T", pattern="LLSS"), 29_192_384),
    (lambda: swin_arch("S", pattern="LLSS"), 50_510_288),
    (lambda: swin_arch("B", pattern="LLSS"), 88_972_488),
    (lambda: vit_arch("B", distilled=True), 87_338_192),
]


@pytest.mark.parametrize("make,want", PARAM_COUNTS)
def test_param_count_equals_reference(make, want):
    arch = make()
    assert count_params(param_shapes(models.build(arch))["params"]) == want


# (arch, closed-form MACs, published GFLOPs = GMACs, to the published precision)
MACS = [
    (lambda: swin_arch("T"), 4_490_566_656, 4.5),
    (lambda: swin_arch("T", pattern="LLSS"), 4_483_341_312, 4.5),
    (lambda: swin_arch("S", pattern="LLSS"), 8_733_649_920, 8.7),
    (lambda: swin_arch("B", pattern="LLSS"), 15_421_313_024, 15.4),
    (lambda: vit_arch("S"), 4_598_882_304, 4.6),
    (lambda: vit_arch("B"), 17_563_828_224, 17.6),
]


@pytest.mark.parametrize("make,want,published", MACS)
def test_macs_pinned_and_match_published(make, want, published):
    got = macs.model_macs(make())
    assert got == want
    assert round(got / 1e9, 1) == published


def test_swin_layout():
    """Stage widths, windows and shifts: FLatten-Swin's linear stages see their whole map."""
    soft = swin_arch("T")
    assert [b.window for b in soft.blocks] == [7] * 12
    # Odd blocks shift by 3, except on the last stage, whose 7x7 map is one window.
    assert [b.shift for b in soft.blocks] == [0, 3, 0, 3, 0, 3, 0, 3, 0, 3, 0, 0]
    flat = swin_arch("T", pattern="LLSS")
    assert flat.pattern == "LLLL" + "SSSSSS" + "SS"
    assert [(b.window, b.shift) for b in flat.blocks[:4]] == [(56, 0)] * 2 + [(28, 0)] * 2
    g = flat.geometry()
    assert (g[0].dim, g[0].tokens, g[0].windows, g[0].grid) == (96, 3136, 1, 56)
    assert (g[4].dim, g[4].tokens, g[4].windows, g[4].window_tokens) == (384, 196, 4, 49)
    assert arch_from_dict(flat.to_dict()) == flat
    assert SwinArch.from_json(flat.to_json()) == flat


def test_bad_swin_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="window 5 does not tile"):
        swin_arch("micro", window=5)
    with pytest.raises(ValueError, match="one of S/L per stage"):
        swin_arch("T", pattern="LLS")
    with pytest.raises(ValueError, match="cannot be merged"):
        swin_arch("micro", image_size=24)  # maps 12/6/3: 3 cannot halve


def test_windows_round_trip():
    arch = swin_arch("micro")
    x = np.random.default_rng(0).standard_normal((2, 16 * 16, 8)).astype(np.float32)
    for block in arch.blocks[:2]:  # unshifted and shifted
        w = to_windows(jnp.asarray(x), block, 16)
        assert w.shape == (2 * 16, 16, 8)
        np.testing.assert_array_equal(from_windows(w, block, 16), x)
    # Window 0 of the unshifted map is the top-left 4x4 patch.
    w = np.asarray(to_windows(jnp.asarray(x), arch.blocks[0], 16))
    np.testing.assert_array_equal(w[0], x[0].reshape(16, 16, 8)[:4, :4].reshape(16, 8))


@pytest.mark.parametrize("resolution,window,shift", [(8, 4, 2), (14, 7, 3)])
def test_shift_mask_allows_only_image_neighbours(resolution, window, shift):
    """After the cyclic shift, two tokens of a window may attend iff neither or both wrapped
    around the image edge, along each axis."""
    mask = shift_mask(resolution, window, shift)
    n = resolution // window
    assert mask.shape == (n * n, window**2, window**2)
    for wi in range(n * n):
        r0, c0 = (wi // n) * window, (wi % n) * window
        rows = r0 + np.arange(window).repeat(window)
        cols = c0 + np.tile(np.arange(window), window)
        wrap_r, wrap_c = rows >= resolution - shift, cols >= resolution - shift
        same = (wrap_r[:, None] == wrap_r[None]) & (wrap_c[:, None] == wrap_c[None])
        np.testing.assert_array_equal(mask[wi] == 0, same)
    assert set(np.unique(mask)) == {0.0, -100.0}


def test_relative_position_index():
    idx = relative_position_index(3)
    assert idx.shape == (9, 9) and idx.max() == 24 and idx.min() == 0
    assert np.all(np.diag(idx) == 12)  # zero offset is the table's centre
    # token (0,0) -> token (2,2): offset (-2,-2) -> row 0; token (2,2) -> (0,0): last row
    assert idx[0, 8] == 0 and idx[8, 0] == 24


@functools.cache
def _apply(arch, method=None):
    return jax.jit(models.build(arch, sites=method).apply)


@pytest.mark.parametrize("pattern,seed", [("SSSS", 0), ("LLSS", 1)])
def test_swin_masked_equals_exported(pattern, seed):
    arch = swin_arch("micro", num_classes=10, pattern=pattern)
    shapes = param_shapes(models.build(arch, sites=AMAP))
    assert set(shapes) == {"params", INDICATORS, SIMILARITY}
    rng = np.random.default_rng(seed)
    masks = random_masks(arch, rng)
    variables = {
        "params": random_params(shapes["params"], seed),
        INDICATORS: logits_for(masks),
        SIMILARITY: jax.tree.map(lambda s: rng.uniform(0.1, 2, s.shape), shapes[SIMILARITY]),
    }
    images = random_images(arch, 2, seed)
    masked = _apply(arch, AMAP)(variables, images)
    small_arch, small_params = AMAP.export(arch, variables)
    exported = _apply(small_arch)({"params": small_params}, images)
    assert np.abs(np.asarray(masked)).max() > 0.1
    assert float(np.abs(masked - exported).max()) <= 1e-5
    dense_like = _apply(arch, AMAP)({**variables, INDICATORS: logits_for(all_kept(arch))}, images)
    assert float(np.abs(masked - dense_like).max()) > 1e-3
    # Windows, shifts and per-head tables survive; widths are the mask counts.
    for i, (b, small) in enumerate(zip(arch.blocks, small_arch.blocks, strict=True)):
        assert (small.window, small.shift, small.heads) == (b.window, b.shift, b.heads)
        assert small.qk_dim == masks[f"block_{i}"]["qk"].sum(1)[0]
        assert small.mlp_dim == masks[f"block_{i}"]["hidden"].sum()
        p = small_params[f"block_{i}"]["attn"]
        if b.attn == SOFTMAX:
            np.testing.assert_array_equal(
                p["relative_position_bias_table"],
                variables["params"][f"block_{i}"]["attn"]["relative_position_bias_table"],
            )
        else:
            assert b.attn == LINEAR
            assert p["positional_encoding"].shape == (b.window**2, b.heads * small.qk_dim)
    want = jax.tree.map(lambda s: s.shape, param_shapes(models.build(small_arch))["params"])
    assert jax.tree.map(np.shape, small_params) == want
    assert macs.model_macs(small_arch) < macs.model_macs(arch)


def test_bfloat16_compute_stays_close_to_float32():
    arch = swin_arch("micro", num_classes=10, pattern="LLSS")
    params = random_params(param_shapes(models.build(arch))["params"], 0)
    images = random_images(arch, 2, 0)
    full = np.asarray(models.build(arch).apply({"params": params}, images))
    half = models.build(arch, dtype=jnp.bfloat16).apply({"params": params}, images)
    assert half.dtype == jnp.float32  # logits are returned in fp32
    assert np.abs(np.asarray(half) - full).max() <= 0.05 * np.abs(full).max()
    assert np.abs(np.asarray(half) - full).max() > 0  # really computed in bf16


def _official_state_dict(seed: int) -> tuple[dict, int]:
    """Random arrays under the official FLatten-Swin-T state-dict names and shapes (recorded
    from the reference code in tests/data), wrapped as its training checkpoints are."""
    path = os.path.join(os.path.dirname(__file__), "data", "flatten_swin_tiny_state_dict.txt")
    rng = np.random.default_rng(seed)
    state, n_params = {}, 0
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            kind, name, shape = line.split()
            shape = tuple(int(d) for d in shape.strip("(),").split(",") if d)
            state[name] = rng.standard_normal(shape).astype(np.float32)
            n_params += int(np.prod(shape)) if kind == "P" else 0
    return {"model": state}, n_params


def test_official_flatten_swin_layout_imports_whole():
    """Every entry of an official checkpoint finds its place and nothing is left over."""
    checkpoint, n_params = _official_state_dict(0)
    model, variables = import_pretrained(checkpoint, "flatten_swin_tiny_patch4_224")
    assert count_params(variables["params"]) == n_params == 29_192_384
    state = checkpoint["model"]
    p = variables["params"]
    qkv = state["layers.0.blocks.0.attn.qkv.weight"]  # [3C, C], rows q | k | v
    np.testing.assert_array_equal(p["block_0"]["attn"]["k"]["kernel"], qkv[96:192].T)
    np.testing.assert_array_equal(
        p["block_0"]["attn"]["positional_encoding"],
        state["layers.0.blocks.0.attn.positional_encoding"][0],
    )
    # Original layout: the merge after stage 0 is the first merge, merge_1.
    np.testing.assert_array_equal(
        p["merge_1"]["reduction"]["kernel"], state["layers.0.downsample.reduction.weight"].T
    )
    np.testing.assert_array_equal(p["head"]["kernel"], state["head.weight"].T)
    # At 448 px the global linear windows double: positional encodings are resized.
    _, big = import_pretrained(checkpoint, "flatten_swin_tiny_patch4_224", image_size=448)
    assert big["params"]["block_0"]["attn"]["positional_encoding"].shape == (112 * 112, 96)
    assert big["params"]["block_2"]["attn"]["positional_encoding"].shape == (56 * 56, 192)


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("pattern", ["SSSS", "LLSS"])
def test_closed_form_macs_match_xla(pattern, pruned):
    """Within 2% of XLA's count (which adds element-wise work), dense and with kept widths of
    60-80%, per-head depthwise kernels included. tanh GELU: XLA counts erf as many FLOPs."""
    arch = swin_arch("T", pattern=pattern, gelu_approximate=True)
    if pruned:
        rng = np.random.default_rng(0)
        kept = lambda n: int(round(n * rng.uniform(0.6, 0.8)))  # noqa: E731
        blocks = tuple(
            dataclasses.replace(
                b,
                qk_dim=kept(b.qk_dim),
                v_dim=kept(b.v_dim),
                mlp_dim=kept(b.mlp_dim),
                qk_scale=b.scale,
                dwc_per_head=b.attn == LINEAR,
            )
            for b in arch.blocks
        )
        arch = arch.replace(blocks=blocks)
    model = models.build(arch)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    counted = macs.xla_macs(model.apply, param_shapes(model), images)
    assert abs(counted / macs.model_macs(arch) - 1) < 0.02
