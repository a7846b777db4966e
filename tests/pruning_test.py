"""Tests for amap_jax.pruning: head-balanced masks, straight-through gradients, similarity
weights, export equivalence and MACs counting."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    all_kept,
    logits_for,
    param_shapes,
    random_balanced_mask,
    random_images,
    random_masks,
    random_params,
)

from amap_jax.methods import amap, projection, similarity
from amap_jax.methods.amap import INDICATORS, SIMILARITY, Amap, group_shapes
from amap_jax.methods.projection import PruneSpec
from amap_jax.models.arch import LINEAR, SOFTMAX, BlockArch, vit_arch
from amap_jax.models.vit import ViT
from amap_jax.pruning import macs

SPEC = PruneSpec()
AMAP = Amap()  # with reweight scales
AMAP_NO_REWEIGHT = Amap(reweight=False)


def _amap(reweight: bool) -> Amap:
    return AMAP if reweight else AMAP_NO_REWEIGHT


def _arch(variant, pattern=None):
    """A small arch for 28x28x1 inputs and 10 classes.

    `pattern=None`: focused linear attention in the first half of the blocks, softmax after.
    A pattern shorter than the variant's depth keeps the variant's widths with fewer blocks.
    """
    depth = len(vit_arch(variant).blocks)
    if pattern is None:
        pattern = LINEAR * (depth // 2) + SOFTMAX * (depth - depth // 2)
    full = (pattern * depth)[:depth]
    arch = vit_arch(variant, in_chans=1, num_classes=10, pattern=full)
    return arch.replace(blocks=arch.blocks[: len(pattern)])


@functools.cache
def _apply(arch, method=None):
    """One compiled forward per (arch, method), shared by the tests (compiling dominates run
    time)."""
    return jax.jit(ViT(arch, sites=method).apply)


def _random_similarity(arch, rng):
    """Positive similarity weights (any positive weights must leave fixed masks unchanged)."""
    return {
        f"block_{i}": {
            g: rng.uniform(1e-3, 3.0, s).astype(np.float32) for g, s in group_shapes(b).items()
        }
        for i, b in enumerate(arch.blocks)
    }


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _leaves_with_paths(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


# ----------------------------------------------------------------------------------------------
# Export: a masked model and its exported smaller model compute the same logits

EXPORT_CASES = [
    # (variant, pattern, seed, reweight, same_v, reexport); each case draws its own random widths
    ("micro", "SS", 0, True, False, False),
    ("micro", "LL", 1, True, False, True),  # re-export checked here: per-head depthwise conv
    # mini's widths and 4x4 grid, two blocks; all heads keep the same value channels, so the
    # exported linear block keeps one shared depthwise kernel
    ("mini", "LS", 3, False, True, False),
]


def _export_case(variant, pattern, seed, reweight, same_v):
    arch = _arch(variant, pattern)
    rng = np.random.default_rng(seed)
    model = ViT(arch, sites=_amap(reweight))
    shapes = param_shapes(model)
    assert set(shapes) == {"params", INDICATORS, SIMILARITY}
    params = random_params(shapes["params"], seed)
    masks = random_masks(arch, rng, same_v=same_v)
    variables = {
        "params": params,
        INDICATORS: logits_for(masks),
        SIMILARITY: _random_similarity(arch, rng),
    }
    return arch, model, variables, masks


@pytest.mark.parametrize("variant,pattern,seed,reweight,same_v,reexport", EXPORT_CASES)
def test_masked_equals_exported(variant, pattern, seed, reweight, same_v, reexport):
    arch, model, variables, masks = _export_case(variant, pattern, seed, reweight, same_v)
    images = random_images(arch, 2, seed)
    method = _amap(reweight)
    apply = _apply(arch, method)
    masked = apply(variables, images)
    small_arch, small_params = method.export(arch, variables)
    apply_small = _apply(small_arch)
    exported = apply_small({"params": small_params}, images)

    assert exported.shape == masked.shape == (2, arch.num_classes)
    assert np.abs(np.asarray(masked)).max() > 0.1  # logits large enough for the 1e-5 to mean much
    assert _max_diff(masked, exported) <= 1e-5
    # The masks matter: the same params with every channel kept give other logits.
    dense_like = apply({**variables, INDICATORS: logits_for(all_kept(arch))}, images)
    assert _max_diff(masked, dense_like) > 1e-3

    # Widths are the mask counts; the softmax scale is the dense one; no reweight is left.
    assert small_arch.pattern == arch.pattern
    for i, (dense_block, block) in enumerate(zip(arch.blocks, small_arch.blocks, strict=True)):
        m = masks[f"block_{i}"]
        assert block.heads == dense_block.heads
        assert block.qk_dim == m["qk"].sum(1)[0]
        assert block.v_dim == m["v"].sum(1)[0]
        assert block.mlp_dim == m["hidden"].sum()
        assert block.scale == pytest.approx(dense_block.qk_dim**-0.5, rel=1e-12)
        heads_differ = not np.all(m["v"] == m["v"][:1])
        assert block.dwc_per_head == (block.attn == LINEAR and heads_differ)
    if same_v:
        assert not any(b.dwc_per_head for b in small_arch.blocks)
    elif LINEAR in pattern:  # these seeds give some linear block heads with different v channels
        assert any(b.dwc_per_head for b in small_arch.blocks)
    assert not any("reweight" in path for path in _leaves_with_paths(small_params))
    # The exported params are exactly what the smaller arch declares.
    want = jax.tree.map(lambda s: s.shape, param_shapes(ViT(small_arch))["params"])
    assert jax.tree.map(np.shape, small_params) == want

    if not reexport:
        return
    # Re-exporting the exported model with every channel kept changes nothing.
    again_arch, again_params = method.export(
        small_arch, {"params": small_params, INDICATORS: logits_for(all_kept(small_arch))}
    )
    assert again_arch == small_arch
    a, b = _leaves_with_paths(small_params), _leaves_with_paths(again_params)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    np.testing.assert_array_equal(apply_small({"params": again_params}, images), exported)


def test_all_kept_masked_model_equals_dense_model():
    arch = _arch("mini", "LS")  # as in an export case: the same compiled model
    params = random_params(param_shapes(ViT(arch))["params"], 3)
    images = random_images(arch, 2, 1)
    dense = _apply(arch)({"params": params}, images)
    ones = all_kept(arch)
    masked = _apply(arch, AMAP_NO_REWEIGHT)(
        {"params": params, INDICATORS: logits_for(ones), SIMILARITY: ones}, images
    )
    assert _max_diff(dense, masked) <= 1e-6


# ----------------------------------------------------------------------------------------------
# Head-balanced projection


_hard_mask = jax.jit(projection.hard_mask, static_argnums=2)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("heads,width,seed", [(1, 7, 0), (4, 5, 1), (6, 64, 2), (1, 1536, 3)])
def test_hard_mask_keeps_same_count_in_every_head(heads, width, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(heads, width)) * 3 + rng.normal() * 2).astype(np.float32)
    weights = rng.uniform(0.2, 2.0, (heads, width)).astype(np.float32)
    m = np.asarray(_hard_mask(logits, weights, SPEC))
    k = int(projection.keep_count(logits, SPEC))
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert np.all(m.sum(1) == k)
    # k is the layer's soft count shared evenly over its heads
    soft = _np_sigmoid(logits.astype(np.float64)).sum() / heads
    assert k == min(max(round(soft), 1), width)
    # top-k of importance = sigmoid(logit) * weight within every head
    a = _np_sigmoid(logits) * weights
    for h in range(heads):
        kept, dropped = a[h][m[h] > 0], a[h][m[h] == 0]
        if dropped.size:
            assert kept.min() >= dropped.max()


def test_hard_mask_min_keep():
    logits = np.full((4, 16), -10.0, np.float32)  # soft count ~0
    assert int(projection.keep_count(logits, SPEC)) == 1
    for min_keep, want in [(3, 3), (40, 16)]:  # min_keep is capped at the width
        spec = PruneSpec(min_keep=min_keep)
        m = np.asarray(_hard_mask(logits, None, spec))
        assert np.all(m.sum(1) == want), (min_keep, m.sum(1))


@pytest.mark.parametrize(
    "width,kept,multiple,want",
    [(64, 10, 1, 10), (64, 10, 8, 16), (64, 16, 8, 16), (64, 17, 8, 24), (20, 17, 8, 20)],
)
def test_hard_mask_multiple(width, kept, multiple, want):
    rng = np.random.default_rng(kept)
    base = random_balanced_mask(rng, 3, width, k=kept)
    m = np.asarray(_hard_mask(projection.fixed_logits(base), None, PruneSpec(multiple=multiple)))
    assert np.all(m.sum(1) == want)
    assert np.all(m >= base)  # rounding up adds channels, never drops a kept one


@pytest.mark.parametrize("width", [5, 64])
@pytest.mark.parametrize("multiple", [2, 8])
def test_keep_count_multiple_on_random_logits(multiple, width):
    rng = np.random.default_rng(multiple)
    for _ in range(20):
        logits = (rng.normal(size=(3, width)) * 4 + rng.normal() * 3).astype(np.float32)
        if np.sum(_np_sigmoid(logits)) / 3 < 0.5:
            continue  # soft count rounds to 0: see the test below
        k = int(projection.keep_count(logits, PruneSpec(multiple=multiple)))
        base = int(projection.keep_count(logits, SPEC))
        assert k % multiple == 0 or k == width
        assert base <= k < base + multiple


@pytest.mark.parametrize("min_keep", [1, 3])
def test_multiple_respected_when_min_keep_decides(min_keep):
    """Soft count ~0: the head keeps min_keep rounded up to the multiple (4), not min_keep."""
    logits = np.full((2, 16), -10.0, np.float32)
    k = int(projection.keep_count(logits, PruneSpec(min_keep=min_keep, multiple=4)))
    assert k == 4


@pytest.mark.parametrize("seed", range(2))
def test_fixed_logits_reproduce_balanced_masks(seed):
    rng = np.random.default_rng(seed)
    heads, width = int(rng.integers(1, 8)), int(rng.integers(1, 80))
    m = random_balanced_mask(rng, heads, width)
    weights = rng.uniform(similarity.EPS, width, (heads, width)).astype(np.float32)
    for w in (None, weights):
        np.testing.assert_array_equal(_hard_mask(projection.fixed_logits(m), w, SPEC), m)


# ----------------------------------------------------------------------------------------------
# Straight-through estimator


def test_mask_forward_is_exactly_binary():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 64)) * 3).astype(np.float32)
    weights = rng.uniform(0.5, 1.5, (6, 64)).astype(np.float32)
    hard = np.asarray(projection.hard_mask(logits, weights, SPEC))
    for fn in (projection.mask, jax.jit(projection.mask, static_argnums=2)):
        np.testing.assert_array_equal(np.asarray(fn(logits, weights, SPEC)), hard)


def test_mask_gradient_is_the_importance_gradient():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(3, 16)) * 2).astype(np.float32)
    weights = rng.uniform(0.5, 1.5, (3, 16)).astype(np.float32)
    c = rng.normal(size=(3, 16)).astype(np.float32)
    g = jax.grad(lambda s: jnp.sum(projection.mask(s, weights, SPEC) * c))(logits)
    p = _np_sigmoid(logits.astype(np.float64))
    np.testing.assert_allclose(np.asarray(g), c * weights * p * (1 - p), rtol=1e-5, atol=1e-7)
    no_ste = PruneSpec(straight_through=False)
    g0 = jax.grad(lambda s: jnp.sum(projection.mask(s, weights, no_ste) * c))(logits)
    assert np.all(np.asarray(g0) == 0)


def test_straight_through_gradients_reach_every_indicator_group():
    arch = _arch("micro", "LS")
    model = ViT(arch, sites=AMAP)
    rng = np.random.default_rng(0)
    shapes = param_shapes(model)
    params = random_params(shapes["params"], 0)
    indicators = jax.tree.map(
        lambda s: rng.normal(1.0, 1.5, s.shape).astype(np.float32), shapes[INDICATORS]
    )
    sim = _random_similarity(arch, rng)
    images = random_images(arch, 2, 0)
    target = rng.normal(size=(2, arch.num_classes)).astype(np.float32)

    def loss(ind):
        logits = model.apply({"params": params, INDICATORS: ind, SIMILARITY: sim}, images)
        return jnp.sum(logits * target)

    grads = jax.jit(jax.grad(loss))(indicators)
    for i in range(len(arch.blocks)):
        for g in ("qk", "v", "hidden"):
            grad = np.asarray(grads[f"block_{i}"][g])
            kept = np.asarray(
                projection.hard_mask(indicators[f"block_{i}"][g], sim[f"block_{i}"][g], SPEC)
            )
            assert np.all(np.isfinite(grad))
            assert np.all(grad[kept > 0] != 0), (i, g)  # every kept channel gets a gradient


# ----------------------------------------------------------------------------------------------
# Channel-similarity weights


def _duplicate_channel(block_params, group, heads, head, c_from, c_to):
    """Copy channel `c_from` of `head` onto `c_to` in every weight that touches it."""
    p = jax.tree.map(np.array, block_params)  # writable copies
    attn, mlp = p["attn"], p["mlp"]
    if group == "hidden":
        cols, rows = [mlp["fc1"]], [mlp["fc2"]]
        width = mlp["fc1"]["kernel"].shape[1]
    elif group == "qk":
        cols, rows = [attn["q"], attn["k"]], []
        width = attn["q"]["kernel"].shape[1] // heads
    else:
        cols, rows = [attn["v"]], [attn["proj"]]
        width = attn["v"]["kernel"].shape[1] // heads
    a, b = head * width + c_from, head * width + c_to
    for layer in cols:
        layer["kernel"][:, b] = layer["kernel"][:, a]
    for layer in rows:
        layer["kernel"][b, :] = layer["kernel"][a, :]
    return p


def _orthogonal_head(block_params, group, heads, head, rng):
    """Make the descriptors of `head`'s channels orthonormal: distinct channels, no redundancy."""
    p = jax.tree.map(np.array, block_params)  # writable copies
    attn, mlp = p["attn"], p["mlp"]
    first, second, second_is_rows = {
        "qk": (attn["q"], attn["k"], False),
        "v": (attn["v"], attn["proj"], True),
        "hidden": (mlp["fc1"], mlp["fc2"], True),
    }[group]
    d_in = first["kernel"].shape[0]
    width = first["kernel"].shape[1] // heads
    cols = slice(head * width, (head + 1) * width)
    basis, _ = np.linalg.qr(rng.normal(size=(2 * d_in, 2 * d_in)))
    desc = basis[:, :width].astype(np.float32)  # [features, width], orthonormal columns
    first["kernel"][:, cols] = desc[:d_in]
    if second_is_rows:
        second["kernel"][cols, :] = desc[d_in:].T
    else:
        second["kernel"][:, cols] = desc[d_in:]
    return p


@pytest.mark.parametrize("group", ["qk", "v", "hidden"])
def test_duplicated_channel_weighs_less_than_distinct_ones(group):
    # micro: every group's descriptors of one head fit orthonormally (width <= features).
    arch = _arch("micro", "LS")
    rng = np.random.default_rng(0)
    params = random_params(param_shapes(ViT(arch))["params"], 0)
    heads, width = group_shapes(arch.blocks[1])[group]
    head = heads - 1
    params["block_1"] = _orthogonal_head(params["block_1"], group, heads, head, rng)

    def weights(block_params):
        desc = similarity.descriptors(block_params, heads)[group]
        return np.asarray(similarity.redundancy_weights(desc))[head]

    w0 = weights(params["block_1"])
    np.testing.assert_allclose(w0, 1.0, rtol=1e-4)  # orthogonal channels: none is redundant
    c_from, c_to = 3, width - 2
    params["block_1"] = _duplicate_channel(params["block_1"], group, heads, head, c_from, c_to)
    w = weights(params["block_1"])
    others = np.delete(w, [c_from, c_to])
    # The pair has redundancy 1/(width-1), every other channel 0; weights normalised to mean 1.
    pair = 1.0 - 1.0 / (width - 1)
    mean = (width - 2 + 2 * pair) / width
    np.testing.assert_allclose(w[[c_from, c_to]], pair / mean, rtol=1e-4)
    np.testing.assert_allclose(others, 1.0 / mean, rtol=1e-4)
    assert max(w[c_from], w[c_to]) < others.min()


@pytest.mark.parametrize("group,seed", [("qk", 0), ("v", 1), ("hidden", 2)])
def test_duplicating_a_channel_lowers_its_weight(group, seed):
    """On random (non-orthogonal) params: the copied channel's weight drops, its twin's too."""
    arch = _arch("mini")
    params = random_params(param_shapes(ViT(arch))["params"], seed)
    rng = np.random.default_rng(seed)
    block_params = params[f"block_{int(rng.integers(len(arch.blocks)))}"]
    heads, width = group_shapes(arch.blocks[0])[group]
    head = int(rng.integers(heads))
    c_from, c_to = rng.choice(width, 2, replace=False)

    def weights(p):
        desc = similarity.descriptors(p, heads)[group]
        return np.asarray(similarity.redundancy_weights(desc))

    before = weights(block_params)
    after = weights(_duplicate_channel(block_params, group, heads, head, c_from, c_to))
    assert after[head, c_from] == pytest.approx(after[head, c_to], rel=1e-5)
    assert after[head, c_from] < before[head, c_from]
    np.testing.assert_allclose(after.mean(-1), 1.0, rtol=1e-5)
    others = [h for h in range(heads) if h != head]
    np.testing.assert_array_equal(after[others], before[others])  # other heads untouched


def test_similarity_weights_have_mean_one_per_head():
    arch = _arch("mini")
    params = random_params(param_shapes(ViT(arch))["params"], 0)
    weights = similarity.similarity_weights(arch, params)
    for i, block in enumerate(arch.blocks):
        for g, shape in group_shapes(block).items():
            w = np.asarray(weights[f"block_{i}"][g])
            assert w.shape == shape
            assert np.all(w > 0)
            np.testing.assert_allclose(w.mean(-1), 1.0, rtol=1e-5)
            assert w.std() > 1e-3  # random channels are not all alike


def test_orthogonal_channels_all_weigh_one():
    desc = np.zeros((2, 4, 8), np.float32)
    for c in range(4):
        desc[:, c, 2 * c] = c + 1.0
    np.testing.assert_allclose(np.asarray(similarity.redundancy_weights(desc)), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# MACs


# DeiT-S: N=197, D=384, 12 blocks; per block 12*N*D^2 (qkv, proj, fc1, fc2) + 2*N^2*D
# (q.k^T and attn.v) = 378,391,296; patch embed 196*768*384 = 57,802,752; head 384*1000.
# Total 12*378,391,296 + 57,802,752 + 384,000 = 4,598,882,304 (papers: 4.6 GFLOPs).
# DeiT-B (D=768): 12*1,453,954,560 + 115,605,504 + 768,000 = 17,563,828,224 (papers: 17.6).
# DeiT-Ti (D=192): 12*101,029,632 + 28,901,376 + 192,000 = 1,253,683,200 (papers: 1.3).
@pytest.mark.parametrize(
    "variant,want", [("Ti", 1_253_683_200), ("S", 4_598_882_304), ("B", 17_563_828_224)]
)
def test_deit_macs_pinned(variant, want):
    assert macs.model_macs(vit_arch(variant)) == want


def _pruned_blocks(arch, rng):
    """Balanced widths at 60-80% kept per group, as an exported arch would have them."""
    blocks = []
    for b in arch.blocks:
        kept = lambda n: int(round(n * rng.uniform(0.6, 0.8)))  # noqa: E731
        blocks.append(
            BlockArch(
                b.attn,
                b.heads,
                kept(b.qk_dim),
                kept(b.v_dim),
                kept(b.mlp_dim),
                qk_scale=b.scale,
                dwc_per_head=b.attn == LINEAR and bool(rng.integers(2)),
            )
        )
    return tuple(blocks)


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("pattern", [None, "LLLLLLSSSSSS"], ids=["softmax", "flatten"])
def test_closed_form_macs_match_xla(pattern, pruned):
    arch = vit_arch("S", pattern=pattern, gelu_approximate=True)
    dense_macs = macs.model_macs(arch)
    if pruned:
        arch = arch.replace(blocks=_pruned_blocks(arch, np.random.default_rng(0)))
        assert macs.model_macs(arch) < 0.85 * dense_macs
    model = ViT(arch)
    variables = param_shapes(model)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    counted = macs.xla_macs(model.apply, variables, images)
    ours = macs.model_macs(arch)
    # XLA also counts element-wise work (norms, softmax, GELU, focusing), which we leave out.
    assert ours <= counted
    assert abs(ours / counted - 1) < 0.02, (ours, counted)


def test_soft_ratio_equals_hard_ratio_for_fixed_logits():
    arch = _arch("mini")
    rng = np.random.default_rng(0)
    params = random_params(param_shapes(ViT(arch, sites=AMAP))["params"], 0)
    masks = random_masks(arch, rng)
    indicators = logits_for(masks)
    small_arch, _ = AMAP.export(arch, {"params": params, INDICATORS: indicators})
    hard = macs.model_macs(small_arch) / macs.model_macs(arch)
    soft = float(amap.soft_ratio(arch, indicators))
    assert hard < 0.9
    assert soft == pytest.approx(hard, rel=1e-6)
    assert float(amap.soft_ratio(arch, logits_for(all_kept(arch)))) == pytest.approx(1.0, rel=1e-6)


def test_soft_ratio_equals_hard_ratio_at_deit_s_size():
    arch = vit_arch("S", pattern="LLLLLLSSSSSS")
    rng = np.random.default_rng(1)
    masks = random_masks(arch, rng)
    blocks = tuple(
        BlockArch(
            b.attn,
            b.heads,
            int(masks[f"block_{i}"]["qk"].sum(1)[0]),
            int(masks[f"block_{i}"]["v"].sum(1)[0]),
            int(masks[f"block_{i}"]["hidden"].sum()),
        )
        for i, b in enumerate(arch.blocks)
    )
    hard = macs.model_macs(arch.replace(blocks=blocks)) / macs.model_macs(arch)
    assert float(amap.soft_ratio(arch, logits_for(masks))) == pytest.approx(hard, rel=1e-6)


def test_soft_ratio_is_differentiable():
    arch = _arch("mini")
    rng = np.random.default_rng(2)
    shapes = param_shapes(ViT(arch, sites=AMAP))[INDICATORS]
    ind = jax.tree.map(lambda s: rng.normal(0.5, 2.0, s.shape).astype(np.float32), shapes)
    ratio = lambda t: amap.soft_ratio(arch, t)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(ratio))(ind)
    assert 0.0 < float(value) < 1.0
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g) > 0)  # more kept, more MACs
    # directional derivative against central differences
    u = jax.tree.map(lambda s: rng.choice([-1.0, 1.0], s.shape).astype(np.float32), shapes)
    eps = 0.05
    up = ratio(jax.tree.map(lambda a, b: a + eps * b, ind, u))
    down = ratio(jax.tree.map(lambda a, b: a - eps * b, ind, u))
    numeric = (float(up) - float(down)) / (2 * eps)
    analytic = sum(
        float(jnp.sum(g * d))
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(u), strict=True)
    )
    assert numeric == pytest.approx(analytic, rel=1e-2, abs=1e-5)


@pytest.mark.parametrize("pattern,seed", [("SS", 0), ("LL", 1), ("LS", 2)])
def test_unbalanced_masks_export_padded_to_widest_head(pattern, seed):
    """Without head balancing, export pads every head to the widest; logits stay the same."""
    method = Amap(head_balanced=False)
    arch = _arch("micro", pattern)
    rng = np.random.default_rng(seed)
    params = random_params(param_shapes(ViT(arch, sites=method))["params"], seed)
    masks = {}
    for i, b in enumerate(arch.blocks):
        masks[f"block_{i}"] = {}
        for g, (heads, width) in group_shapes(b).items():
            m = np.zeros((heads, width), np.float32)
            for h in range(heads):  # a different count in every head
                m[h, rng.choice(width, 2 + 5 * h + rng.integers(0, 3), replace=False)] = 1
            masks[f"block_{i}"][g] = m
    variables = {
        "params": params,
        INDICATORS: logits_for(masks),
        SIMILARITY: _random_similarity(arch, rng),
    }
    images = random_images(arch, 2, seed)
    masked = _apply(arch, method)(variables, images)
    small_arch, small_params = method.export(arch, variables)
    exported = _apply(small_arch)({"params": small_params}, images)
    assert np.abs(np.asarray(masked)).max() > 0.1
    assert _max_diff(masked, exported) <= 1e-5
    for i, block in enumerate(small_arch.blocks):
        m = masks[f"block_{i}"]
        assert m["qk"].sum(1).min() < block.qk_dim == m["qk"].sum(1).max()
        assert m["v"].sum(1).min() < block.v_dim == m["v"].sum(1).max()
        assert block.mlp_dim == m["hidden"].sum()


# ----------------------------------------------------------------------------------------------
# Scores to head-balanced widths at a MACs target (pruning.widths), shared by AMAP and the baselines


def _width_cases():
    from amap_jax.models.arch import swin_arch

    return [
        ("vit", vit_arch("mini", in_chans=1, num_classes=10, pattern="LLSS")),
        ("swin", swin_arch("micro", num_classes=10, pattern="LLSS")),
    ]


def _site_scores(arch, seed):
    from amap_jax import models

    rng = np.random.default_rng(seed)
    return [
        {s: rng.random(shape) for s, shape in models.site_shapes(b, g.dim).items() if s in
         ("qk", "v", "hidden")}
        for b, g in zip(arch.blocks, arch.geometry(), strict=True)
    ]  # fmt: skip


@pytest.mark.parametrize("name,arch", _width_cases(), ids=[c[0] for c in _width_cases()])
@pytest.mark.parametrize("target", [0.9, 0.6, 0.3])
def test_balanced_widths_meet_a_macs_target_to_one_step(name, arch, target):
    from amap_jax.pruning import export, widths

    scores = _site_scores(arch, 0)
    plan = widths.at_target(arch, scores, target, minimum=lambda s, w: 1)
    assert plan.ratio <= target
    # The last step was needed: the target is met to within the largest step there is.
    step = max(
        widths.ratio(arch, [{**c, s: c[s] + 1} if j == i else c for j, c in enumerate(plan.counts)])
        - plan.ratio
        for i, counts in enumerate(plan.counts)
        for s in counts
    )
    assert plan.ratio > target - step
    assert all(isinstance(k, int) and k >= 1 for c in plan.counts for k in c.values())
    # The masks keep the top-scored channels of every head, the same count in each head, and
    # export to exactly the planned ratio.
    masks = plan.masks(scores)
    for m, s, counts in zip(masks, scores, plan.counts, strict=True):
        for site, k in counts.items():
            assert (m[site].sum(-1) == k).all()
            kept_min = np.where(m[site] > 0, s[site], np.inf).min(-1)
            dropped_max = np.where(m[site] > 0, -np.inf, s[site]).max(-1)
            assert (kept_min >= dropped_max).all()
    assert macs.ratio(arch, export.pruned_arch(arch, masks)) == pytest.approx(plan.ratio)


def test_unbalanced_widths_count_the_widest_head():
    from amap_jax.pruning import export, widths

    arch = vit_arch("mini", in_chans=1, num_classes=10, pattern="SSSS")
    scores = _site_scores(arch, 1)
    rng = np.random.default_rng(2)
    start = [
        {s: rng.integers(np.shape(v)[1] // 2, np.shape(v)[1] + 1, np.shape(v)[0]) for s, v in
         b.items()}
        for b in scores
    ]  # fmt: skip
    before = widths.ratio(arch, start)
    plan = widths.at_target(arch, scores, before - 0.05, start=start, balanced=False)
    assert before - 0.05 - 0.02 < plan.ratio <= before - 0.05
    masks = plan.masks(scores)
    assert any(len(set(np.asarray(c["v"]).tolist())) > 1 for c in plan.counts)  # heads differ
    # What export computes (every head padded to the widest) is what was planned.
    assert macs.ratio(arch, export.pruned_arch(arch, masks)) == pytest.approx(plan.ratio)


def test_widths_start_where_a_search_ended_and_respect_per_head_minimums():
    from amap_jax.pruning import widths

    arch = vit_arch("mini", in_chans=1, num_classes=10, pattern="SSSS")
    scores = _site_scores(arch, 3)
    full = [{s: np.shape(v)[1] for s, v in b.items()} for b in scores]
    low = widths.at_target(arch, scores, 0.4)
    again = widths.at_target(arch, scores, 0.6, start=low.counts)
    assert again.counts == low.counts  # already under the target: nothing removed
    at_minimum = widths.at_target(arch, scores, 0.6, minimum=lambda s, w: w // 2)
    assert all(
        k >= f[s] // 2 for b, f in zip(at_minimum.counts, full, strict=True) for s, k in b.items()
    )
    with pytest.raises(
        ValueError, match="cannot reach MACs ratio 0.1: every layer is at its per-head minimum"
    ):
        widths.at_target(arch, scores, 0.1, minimum=lambda s, w: w // 2)


def test_one_bisection_lands_every_budget_on_the_side_that_meets_it():
    from amap_jax.pruning import allocate

    falling = lambda x: 1.0 - x / 100  # noqa: E731
    assert allocate.lowest(falling, 0.655, 0, 100, integer=True) == 35  # 0.65 <= 0.655 < 0.66
    x = allocate.lowest(falling, 0.5, 0.0, 100.0)
    assert falling(x) <= 0.5 and x == pytest.approx(50.0)
    rising = lambda x: x * x  # noqa: E731
    x = allocate.highest(rising, 0.25, 0.0, 1.0)
    assert rising(x) <= 0.25 and x == pytest.approx(0.5)
    level = jax.jit(lambda aim: allocate.traced_level(lambda d: jnp.tanh(d), aim, -5.0, 5.0, 40))
    assert float(jnp.tanh(level(0.3))) == pytest.approx(0.3, abs=1e-5)
