"""Tests for amap_jax.models: architecture descriptions, ViT / FLatten-ViT, both attention kinds."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import count_params, param_shapes, random_images, random_params

from amap_jax.models.arch import LINEAR, SOFTMAX, BlockArch, Geometry, ViTArch, vit_arch
from amap_jax.models.attention import Attention
from amap_jax.models.vit import ViT

# ----------------------------------------------------------------------------------------------
# Parameter counts


def _formula_count(arch: ViTArch) -> int:
    """Parameter count of a dense (ViT or FLatten-ViT) arch, written out independently.

    patch conv P*P*C*D + D; cls D; pos_embedding N*D; per block: two LayerNorms 4D,
    q/k/v/proj 4(D*D + D), fc1 D*F + F, fc2 F*D + D; final LayerNorm 2D; head D*K + K.
    A focused-linear block adds positional_encoding N*D, scale D and the depthwise conv that all
    heads share: a 5x5 kernel over d = D/H channels plus d biases (25d + d).
    """
    d_, n, p = arch.embed_dim, arch.num_tokens, arch.patch_size
    total = p * p * arch.in_chans * d_ + d_ + d_ + n * d_
    for b in arch.blocks:
        f = b.mlp_dim
        total += 4 * d_ + 4 * (d_ * d_ + d_) + (d_ * f + f) + (f * d_ + d_)
        if b.attn == LINEAR:
            head_dim = d_ // b.heads
            total += n * d_ + d_ + arch.kernel_size**2 * head_dim + head_dim
    return total + 2 * d_ + d_ * arch.num_classes + arch.num_classes


def _half_linear(variant: str) -> str:
    """FLatten-style pattern for a variant: focused linear attention in the first half."""
    depth = len(vit_arch(variant).blocks)
    return LINEAR * (depth // 2) + SOFTMAX * (depth - depth // 2)


# Ti/S/B equal timm's deit_{tiny,small,base}_patch16_224.
# mini: D=64, 4 blocks of 2 heads, F=256, P=7, C=1, N=4*4+1=17, K=10:
#   7*7*64+64 + 64 + 17*64 + 4*(4*64 + 4*(64*64+64) + 64*256+256 + 256*64+64) + 2*64 + 64*10+10
#   = 3200 + 64 + 1088 + 4*49984 + 128 + 650 = 205,066
# micro: D=32, 2 blocks of 2 heads, F=64, P=4, N=7*7+1=50:
#   4*4*32+32 + 32 + 50*32 + 2*(4*32 + 4*(32*32+32) + 32*64+64 + 64*32+32) + 2*32 + 32*10+10
#   = 544 + 32 + 1600 + 2*8544 + 64 + 330 = 19,658
# Focused linear blocks add positional_encoding N*D, scale D, depthwise conv 5*5*d + d (d = D/H):
# mini "LLSS": + 2 * (17*64 + 64 + 25*32 + 32) = + 2 * 1984 = 209,034
# micro "LS": + (50*32 + 32 + 25*16 + 16) = + 2048 = 21,706
# S "LLLLLLSSSSSS": + 6 * (197*384 + 384 + 25*64 + 64) = + 6 * 77696 = 22,516,840
PARAM_COUNTS = [
    ("Ti", 3, 1000, None, 5_717_416),
    ("S", 3, 1000, None, 22_050_664),
    ("B", 3, 1000, None, 86_567_656),
    ("mini", 1, 10, None, 205_066),
    ("micro", 1, 10, None, 19_658),
    ("mini", 1, 10, "LLSS", 209_034),
    ("mini4", 1, 10, None, 205_066),  # heads split the same width: the same parameters
    ("mini4", 1, 10, "LLSS", 208_202),  # but FLatten's depthwise kernel is per head width
    ("micro", 1, 10, "LS", 21_706),
    ("S", 3, 1000, "LLLLLLSSSSSS", 22_516_840),
]


@pytest.mark.parametrize("variant,in_chans,num_classes,pattern,expected", PARAM_COUNTS)
def test_param_count(variant, in_chans, num_classes, pattern, expected):
    arch = vit_arch(variant, in_chans=in_chans, num_classes=num_classes, pattern=pattern)
    shapes = param_shapes(ViT(arch))
    assert set(shapes) == {"params"}  # a dense model declares no pruning collections
    assert count_params(shapes["params"]) == expected
    assert _formula_count(arch) == expected


def test_linear_block_param_shapes():
    arch = vit_arch("mini", in_chans=1, num_classes=10, pattern=_half_linear("mini"))
    p = param_shapes(ViT(arch))["params"]
    for i, b in enumerate(arch.blocks):
        attn = p[f"block_{i}"]["attn"]
        if b.attn == LINEAR:
            assert attn["positional_encoding"].shape == (arch.num_tokens, arch.embed_dim)
            assert attn["scale"].shape == (arch.embed_dim,)
            ks = arch.kernel_size
            assert attn["dwc"]["kernel"].shape == (ks, ks, 1, b.v_dim)  # shared by all heads
            assert attn["dwc"]["bias"].shape == (b.v_dim,)
        else:
            assert set(attn) == {"q", "k", "v", "proj"}


# ----------------------------------------------------------------------------------------------
# Forward pass and architecture descriptions


@pytest.mark.parametrize(
    "variant,pattern", [("micro", "SS"), ("micro", "LL"), ("micro", "LS"), ("mini", "half")]
)
def test_forward_shape_and_finite(variant, pattern):
    pattern = _half_linear(variant) if pattern == "half" else pattern
    arch = vit_arch(variant, in_chans=1, num_classes=10, pattern=pattern)
    model = ViT(arch)
    params = random_params(param_shapes(model)["params"], seed=1)
    logits = jax.jit(model.apply)({"params": params}, random_images(arch, 3, seed=2))
    assert logits.shape == (3, 10)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    assert np.ptp(np.asarray(logits), axis=0).min() > 1e-3  # images give different logits


def test_arch_json_round_trip():
    arch = vit_arch("mini", in_chans=1, num_classes=10, pattern=_half_linear("mini"))
    assert ViTArch.from_json(arch.to_json()) == arch
    # A pruned arch: uneven widths, pinned softmax scale, per-head depthwise conv.
    blocks = list(arch.blocks)
    blocks[0] = BlockArch(LINEAR, 3, 7, 5, 100, qk_scale=32**-0.5, dwc_per_head=True)
    blocks[-1] = BlockArch(SOFTMAX, 3, 9, 11, 200, qk_scale=32**-0.5, attn_in=(0, 5, 63))
    blocks[1] = BlockArch(LINEAR, 2, 32, 32, 256, mlp_in=tuple(range(1, 64, 2)))
    pruned = arch.replace(blocks=tuple(blocks), gelu_approximate=True)
    back = ViTArch.from_json(pruned.to_json())
    assert back == pruned
    assert back.blocks[0].dwc_per_head and back.blocks[-1].scale == 32**-0.5
    assert back.blocks[-1].attn_in == (0, 5, 63) and len(back.blocks[1].mlp_in) == 32
    assert isinstance(back.blocks, tuple) and isinstance(back.mean, tuple)


def test_arch_json_rejects_unknown_fields_and_types():
    d = json.loads(vit_arch("micro", in_chans=1, num_classes=10).to_json())
    with pytest.raises(ValueError, match="unknown"):
        ViTArch.from_dict({**d, "depth_multiplier": 2})
    with pytest.raises(ValueError, match="type"):
        ViTArch.from_dict({**d, "type": "swin"})


def test_bad_arch_raises():
    with pytest.raises(ValueError, match="multiple"):
        vit_arch("mini", in_chans=1, num_classes=10, image_size=30)
    arch = vit_arch("micro", in_chans=1, num_classes=10)
    with pytest.raises(ValueError, match="multiple"):
        arch.replace(image_size=30)
    with pytest.raises(ValueError):
        vit_arch("micro", pattern="SSS")  # micro has 2 blocks
    with pytest.raises(ValueError):
        vit_arch("huge")
    with pytest.raises(ValueError):
        BlockArch("X", 2, 8, 8, 16)
    with pytest.raises(ValueError):
        BlockArch(SOFTMAX, 2, 0, 8, 16)
    with pytest.raises(ValueError):
        arch.replace(mean=(0.5, 0.5))  # one mean per input channel


# ----------------------------------------------------------------------------------------------
# Attention against independent numpy references (float64)

EMBED, GRID = 24, 5
TOKENS = GRID * GRID + 1  # cls + 5x5 patch grid
GEOMETRY = Geometry(EMBED, TOKENS, TOKENS, 1, GRID)


def _softplus(x):
    return np.log1p(np.exp(x))


def _np_linear(x, p):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _np_dwc(v, kernel, bias, grid):
    """SAME-padded depthwise cross-correlation over a [B, grid*grid, C] token grid."""
    b, _, c = v.shape
    ks = kernel.shape[0]
    img = np.pad(v.reshape(b, grid, grid, c), ((0, 0), (ks // 2,) * 2, (ks // 2,) * 2, (0, 0)))
    out = np.zeros((b, grid, grid, c))
    for i in range(ks):
        for j in range(ks):
            out += img[:, i : i + grid, j : j + grid, :] * kernel[i, j]
    return (out + bias).reshape(b, grid * grid, c)


def _np_attention(block: BlockArch, p, x, qk_mask=None, v_scale=None, focusing=3.0):
    """One block's attention written from the FLatten / ViT formulas, in float64."""
    h, dqk, dv = block.heads, block.qk_dim, block.v_dim
    x = np.asarray(x, np.float64)
    bsz, n, _ = x.shape
    q, k, v = (_np_linear(x, p[name]) for name in ("q", "k", "v"))
    if block.attn == SOFTMAX:
        if qk_mask is not None:
            q, k = q * qk_mask, k * qk_mask
        scale = block.qk_scale if block.qk_scale is not None else dqk**-0.5
        qh = q.reshape(bsz, n, h, dqk).transpose(0, 2, 1, 3)
        kh = k.reshape(bsz, n, h, dqk).transpose(0, 2, 1, 3)
        vh = v.reshape(bsz, n, h, dv).transpose(0, 2, 1, 3)
        s = qh @ kh.transpose(0, 1, 3, 2) * scale
        s = np.exp(s - s.max(-1, keepdims=True))
        out = (s / s.sum(-1, keepdims=True)) @ vh
        out = out.transpose(0, 2, 1, 3).reshape(bsz, n, h * dv)
    else:
        k = k + np.asarray(p["positional_encoding"], np.float64)
        q, k = np.maximum(q, 0) + 1e-6, np.maximum(k, 0) + 1e-6
        if qk_mask is not None:
            q, k = q * qk_mask, k * qk_mask
        sp = _softplus(np.asarray(p["scale"], np.float64))
        q, k = q / sp, k / sp

        def focus(t):  # power p; each token's norm over all heads together is restored
            tp = t**focusing
            return (
                tp
                * np.linalg.norm(t, axis=-1, keepdims=True)
                / np.linalg.norm(tp, axis=-1, keepdims=True)
            )

        q, k = focus(q), focus(k)
        out = np.zeros((bsz, n, h * dv))
        for b in range(bsz):
            for hh in range(h):
                qi = q[b, :, hh * dqk : (hh + 1) * dqk]
                ki = k[b, :, hh * dqk : (hh + 1) * dqk]
                vi = v[b, :, hh * dv : (hh + 1) * dv]
                z = 1.0 / (qi @ ki.mean(0) + 1e-6)
                kv = (ki.T * n**-0.5) @ (vi * n**-0.5)
                out[b, :, hh * dv : (hh + 1) * dv] = (qi @ kv) * z[:, None]
        kernel = np.asarray(p["dwc"]["kernel"], np.float64)[:, :, 0, :]
        bias = np.asarray(p["dwc"]["bias"], np.float64)
        if not block.dwc_per_head:  # the same dv-channel kernel in every head
            kernel, bias = np.tile(kernel, (1, 1, h)), np.tile(bias, h)
        out[:, 1:] += _np_dwc(v[:, 1:], kernel, bias, GRID)  # the cls token gets no conv term
    if v_scale is not None:
        out = out * v_scale
    return _np_linear(out, p["proj"])


ATTN_CASES = {
    "softmax-dense": BlockArch(SOFTMAX, 3, 8, 8, 48),
    "softmax-pruned": BlockArch(SOFTMAX, 3, 5, 3, 48, qk_scale=8**-0.5),
    "linear-dense": BlockArch(LINEAR, 3, 8, 8, 48),
    "linear-pruned": BlockArch(LINEAR, 3, 5, 3, 48, qk_scale=8**-0.5),
    "linear-per-head-dwc": BlockArch(LINEAR, 3, 5, 3, 48, dwc_per_head=True),
}


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_matches_numpy_reference(case, masked):
    block = ATTN_CASES[case]
    attn = Attention(block, GEOMETRY)
    x = np.random.default_rng(0).standard_normal((2, TOKENS, EMBED)).astype(np.float32)
    params = random_params(param_shapes(attn, x)["params"], seed=2, noise=0.5)
    qk_mask = v_scale = None
    if masked:
        rng = np.random.default_rng(3)
        # Few q/k channels kept: many tokens then have all kept q (or k) channels at the +1e-6
        # floor, where a masked channel that is not exactly 0 would change the result.
        qk_mask = (rng.random(block.heads * block.qk_dim) < 0.25).astype(np.float32)
        v_mask = (rng.random(block.heads * block.v_dim) < 0.6).astype(np.float32)
        qk_mask[0] = v_mask[0] = 1.0
        v_scale = v_mask * rng.uniform(0.5, 1.5, v_mask.shape).astype(np.float32)  # reweighted
    got = jax.jit(attn.apply)({"params": params}, x, qk_mask, v_scale)
    want = _np_attention(block, params, x, qk_mask, v_scale)
    assert got.shape == (2, TOKENS, EMBED)
    assert np.abs(want).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_focused_linear_differs_from_softmax():
    """Guards the reference test: the two kinds compute different functions on the same params."""
    x = np.random.default_rng(0).standard_normal((1, TOKENS, EMBED)).astype(np.float32)
    lin = Attention(ATTN_CASES["linear-dense"], GEOMETRY)
    soft = Attention(ATTN_CASES["softmax-dense"], GEOMETRY)
    params = random_params(param_shapes(lin, x)["params"], seed=2, noise=0.5)
    shared = {k: params[k] for k in ("q", "k", "v", "proj")}
    a = jax.jit(lin.apply)({"params": params}, x)
    b = jax.jit(soft.apply)({"params": shared}, x)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2


def test_dense_takes_site_multipliers_on_its_kernel():
    """`attention.Dense` has `nn.Dense`'s parameters (checkpoints unchanged) and scaling its
    kernel's rows / columns equals scaling its input / output channels."""
    import chex
    import flax.linen as nn
    import jax.numpy as jnp

    from amap_jax.models.attention import Dense, dense_init

    x = jax.random.normal(jax.random.key(1), (2, 5, 6))
    ours, ref = Dense(4), nn.Dense(4, kernel_init=dense_init)
    p = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(p, ref.init(jax.random.key(0), x))
    p = jax.tree.map(lambda a: a + 0.1, p)  # a non-zero bias
    rows, cols = jnp.array([1.0, 0.0, 0.5, 2.0, 1.0, 0.0]), jnp.array([0.0, 1.0, 0.3, 1.0])
    np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), atol=1e-6)
    np.testing.assert_allclose(ours.apply(p, x, rows=rows), ref.apply(p, x * rows), atol=1e-6)
    np.testing.assert_allclose(ours.apply(p, x, cols=cols), ref.apply(p, x) * cols, atol=1e-6)
