"""AMAP's indicators before the search moves them: their start, and the signal of how much
removing a channel changes its layer's output, which sets that start and relevels linear
attention's q/k indicators (whose loss gradients sum to zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from amap_jax import models
from amap_jax.models.arch import LINEAR, Arch

INDICATORS = "indicators"
SIMILARITY = "similarity"
GROUPS = ("qk", "v", "hidden")


def group_shapes(block) -> dict[str, tuple[int, int]]:
    """AMAP's channel groups of a block as [heads, width]; the MLP is one 'head'."""
    shapes = models.site_shapes(block, 0)
    return {g: shapes[g] for g in GROUPS}


def constant_indicators(arch: Arch, logit: float):
    return {
        f"block_{i}": {g: jnp.full(s, logit, jnp.float32) for g, s in group_shapes(b).items()}
        for i, b in enumerate(arch.blocks)
    }


def attention_difference(arch: Arch, params, images, *, softmax_too: bool = False, chunk: int = 16):
    """Per block, relative change of the attention output when one channel is removed.

    Returns {'block_i': {'qk': [H, dqk], 'v': [H, dv]}} for linear-attention blocks (and
    softmax blocks if `softmax_too`): ||A(x) - A_{-c}(x)||_F / ||A(x)||_F averaged over images.
    """
    _, inter = models.build(arch).apply({"params": params}, images, mutable=["intermediates"])
    out = {}
    for i, b in enumerate(arch.blocks):
        if b.attn != LINEAR and not softmax_too:
            continue
        y = inter["intermediates"][f"block_{i}"]["attn_input"][0]
        attn = models.attention(arch, i)
        variables = {"params": params[f"block_{i}"]["attn"]}
        base = attn.apply(variables, y)
        base_norm = jnp.linalg.norm(base.reshape(base.shape[0], -1), axis=-1) + 1e-12

        def rel_diff(
            qk_mask, v_mask, attn=attn, variables=variables, y=y, base=base, base_norm=base_norm
        ):
            o = attn.apply(variables, y, qk_mask, v_mask)
            d = jnp.linalg.norm((o - base).reshape(o.shape[0], -1), axis=-1)
            return jnp.mean(d / base_norm)

        qk_drop = 1.0 - jnp.eye(b.heads * b.qk_dim)
        v_drop = 1.0 - jnp.eye(b.heads * b.v_dim)
        qk = jax.lax.map(lambda m, f=rel_diff: f(m, None), qk_drop, batch_size=chunk)
        v = jax.lax.map(lambda m, f=rel_diff: f(None, m), v_drop, batch_size=chunk)
        out[f"block_{i}"] = {"qk": qk.reshape(b.heads, b.qk_dim), "v": v.reshape(b.heads, b.v_dim)}
    return out


def mlp_difference(arch: Arch, params, images):
    """Per block, relative change of the MLP output when one hidden unit is removed:
    {'block_i': {'hidden': [1, F]}}. Removing unit c takes h_c * fc2[c] off the output, so
    ||change||_F = ||h_c||_2 * ||fc2[c]||_2 in closed form, per image, over its ||output||_F."""
    _, inter = models.build(arch).apply({"params": params}, images, mutable=["intermediates"])
    out = {}
    for i in range(len(arch.blocks)):
        mlp = params[f"block_{i}"]["mlp"]
        y = inter["intermediates"][f"block_{i}"]["mlp_input"][0]
        h = y @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]
        h = jax.nn.gelu(h, approximate=arch.gelu_approximate)
        o = h @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
        h_norm = jnp.sqrt(jnp.sum(h.reshape(h.shape[0], -1, h.shape[-1]) ** 2, axis=1))  # [B, F]
        change = h_norm * jnp.linalg.norm(mlp["fc2"]["kernel"], axis=-1)  # [B, F]
        o_norm = jnp.linalg.norm(o.reshape(o.shape[0], -1), axis=-1)[:, None] + 1e-12
        out[f"block_{i}"] = {"hidden": jnp.mean(change / o_norm, axis=0)[None]}
    return out


def logits_from_scores(scores: jax.Array, base: float, spread: float) -> jax.Array:
    """Initial logits rising with the score: base + spread * z-score over the group."""
    z = (scores - scores.mean()) / (scores.std() + 1e-12)
    return base + spread * z


def init_indicators(arch: Arch, params, method, calib_images=None):
    """Indicator logits of an `Amap` `method`: constant, or rising with how much removing the
    channel changes its layer's output, where measured (`init`: attention differences of
    linear attention, of softmax too with `init_on_softmax`; `output_diff`: of every attention
    and MLP)."""
    ind = constant_indicators(arch, method.init_logit)
    if method.init == "constant":
        return ind
    if calib_images is None:
        raise ValueError(f"{method.init} initialisation needs a calibration batch")
    everywhere = method.init == "output_diff"
    diffs = attention_difference(
        arch, params, calib_images, softmax_too=method.init_on_softmax or everywhere
    )
    if everywhere:
        for blk, groups in mlp_difference(arch, params, calib_images).items():
            diffs.setdefault(blk, {}).update(groups)
    for blk, groups in diffs.items():
        for g, d in groups.items():
            ind[blk][g] = logits_from_scores(d, method.init_logit, method.init_spread)
    return ind


def linear_blocks(arch: Arch) -> list[int]:
    return [i for i, b in enumerate(arch.blocks) if b.attn == LINEAR]


def weights_only(params) -> dict:
    """The model's own weights out of a search's `params` (without its reweight scales)."""
    return {
        k: (
            {n: x for n, x in v.items() if not n.startswith("reweight_")}
            if k.startswith("block_")
            else v
        )
        for k, v in params.items()
    }


def relevel_linear_qk(arch: Arch, params, indicators, images):
    """Linear attention's q/k indicators set from how much each channel changes its block.

    A focused linear block computes the same output when all its q (or k) channels are scaled
    together, so the loss gradients of its q/k multipliers sum to zero: the loss never says how
    many to keep. Its value channels have no such invariance; their indicators carry the
    loss's verdict. Both groups are measured in one currency, the relative change of the
    block's attention output when the channel is removed (`attention_difference`, the
    paper's signal), and each q/k channel gets the indicator a value channel of the same
    block with the same change has (quantile matching of the two groups; a sliver of the
    q/k change's z-score breaks ties, so the order of the q/k channels is the order of their
    changes). Blocks without linear attention are returned unchanged."""
    diffs = attention_difference(arch, weights_only(params), images)
    out = dict(indicators)
    for blk, d in diffs.items():
        v_logits = jnp.sort(indicators[blk]["v"].ravel())
        v_diffs = jnp.sort(d["v"].ravel())
        qk = jnp.interp(d["qk"], v_diffs, v_logits)
        z = (d["qk"] - d["qk"].mean()) / (d["qk"].std() + 1e-12)
        out[blk] = {**indicators[blk], "qk": qk + 1e-3 * z}
    return out


def qk_gradients(arch: Arch, params, indicators, images, method) -> dict:
    """Per block, the loss gradients of its q/k indicators (through the straight-through
    masks, on `images` with their argmax as labels). For tests and probes."""
    model = models.build(arch, sites=method)

    def loss(ind):
        logits = model.apply({"params": params, INDICATORS: ind}, images)
        labels = jax.lax.stop_gradient(jnp.argmax(logits, -1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss)(indicators)
    return {blk: g["qk"] for blk, g in grads.items()}


def linear_qk_gradient(arch: Arch, params, indicators, images, method) -> dict:
    """Per linear block, the sum of its q/k indicators' loss gradients (`qk_gradients`): ~0,
    the scale invariance `relevel_linear_qk` works around."""
    grads = qk_gradients(arch, params, indicators, images, method)
    return {f"block_{i}": float(jnp.sum(grads[f"block_{i}"])) for i in linear_blocks(arch)}
