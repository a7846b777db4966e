"""Export: rewrite a masked model into a smaller dense model with the same logits.

Kernels are sliced to the kept channels, reweight scales are folded into the next layer, and
the softmax scale of the dense model is kept. Nothing of the pruning machinery is left over.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from amap_jax.models.arch import LINEAR, Arch, BlockArch
from amap_jax.models.block import INDICATORS, SIMILARITY
from amap_jax.pruning import projection
from amap_jax.pruning.projection import PruneSpec


def kept_channels(variables, arch: Arch, spec: PruneSpec) -> list[dict[str, np.ndarray]]:
    """Per block and group, the kept channel indices as [heads, k] (sorted within a head).

    Without head balancing, heads keep different counts: every head is padded to the widest
    with channels it dropped, returned as negative indices (-1 - channel) so that export can
    zero them out.
    """
    indicators = variables[INDICATORS]
    similarity = variables.get(SIMILARITY)
    out = []
    for i in range(len(arch.blocks)):
        groups = {}
        for g, logits in indicators[f"block_{i}"].items():
            w = None if similarity is None else similarity[f"block_{i}"][g]
            keep = np.asarray(projection.hard_mask(logits, w, spec)) > 0
            width = int(keep.sum(-1).max())
            rows = []
            for row in keep:
                kept, dropped = np.flatnonzero(row), np.flatnonzero(~row)
                pad = -1 - dropped[: width - len(kept)]
                rows.append(np.concatenate([kept, pad]))
            groups[g] = np.stack(rows)
        out.append(groups)
    return out


# softplus(PAD_SCALE) ~ PAD_SCALE: a padded focused-attention channel holds 1e-6 / 1e4 = 1e-10,
# whose cube and squared norm vanish next to any real channel.
PAD_SCALE = 1e4


def _flat(idx: np.ndarray, width: int) -> np.ndarray:
    """[heads, k] indices within heads of `width` -> flat indices over heads."""
    return (idx + width * np.arange(idx.shape[0])[:, None]).reshape(-1)


def _dense(p, cols=None, rows=None, row_scale=None):
    kernel, bias = np.asarray(p["kernel"]), np.asarray(p["bias"])
    if rows is not None:
        kernel = kernel[rows]
        if row_scale is not None:
            kernel = kernel * row_scale[:, None]
    if cols is not None:
        kernel, bias = kernel[:, cols], bias[cols]
    return {"kernel": kernel, "bias": bias}


def _export_block(block: BlockArch, p, keep) -> tuple[BlockArch, dict]:
    qk_pad, v_pad = keep["qk"] < 0, keep["v"] < 0
    qk = np.where(qk_pad, -1 - keep["qk"], keep["qk"])
    v = np.where(v_pad, -1 - keep["v"], keep["v"])
    hidden = keep["hidden"]
    qk_cols, v_cols = _flat(qk, block.qk_dim), _flat(v, block.v_dim)
    hidden_cols = hidden.reshape(-1)
    attn, mlp = p["attn"], p["mlp"]
    v_scale = np.asarray(attn["reweight"])[v_cols] if "reweight" in attn else np.ones(len(v_cols))
    v_scale = np.where(v_pad.reshape(-1), 0.0, v_scale)  # padded value channels reach nothing
    hidden_scale = np.asarray(mlp["reweight"])[hidden_cols] if "reweight" in mlp else None
    new_attn = {
        "q": _dense(attn["q"], cols=qk_cols),
        "k": _dense(attn["k"], cols=qk_cols),
        "v": _dense(attn["v"], cols=v_cols),
        "proj": _dense(attn["proj"], rows=v_cols, row_scale=v_scale.astype(np.float32)),
    }
    if "relative_position_bias_table" in attn:  # per head: untouched, heads are never removed
        new_attn["relative_position_bias_table"] = np.asarray(attn["relative_position_bias_table"])
    pad = qk_pad.reshape(-1)
    for name in ("q", "k"):  # padded q/k channels: zero before the ReLU
        for leaf in ("kernel", "bias"):
            new_attn[name][leaf][..., pad] = 0.0
    per_head = block.dwc_per_head
    if block.attn == LINEAR:
        pos = np.array(attn["positional_encoding"])[:, qk_cols]
        pos[:, pad] = 0.0
        new_attn["positional_encoding"] = pos
        new_attn["scale"] = np.where(pad, PAD_SCALE, np.asarray(attn["scale"])[qk_cols])
        dwc = attn["dwc"]
        same_in_every_head = bool(np.all(v == v[:1]))
        if block.dwc_per_head:
            sel = v_cols
        elif same_in_every_head:
            sel = v[0]
        else:  # heads keep different rows of the shared kernel: one kernel per head
            sel, per_head = v.reshape(-1), True
        new_attn["dwc"] = {
            "kernel": np.asarray(dwc["kernel"])[..., sel],
            "bias": np.asarray(dwc["bias"])[sel],
        }
    new_mlp = {
        "fc1": _dense(mlp["fc1"], cols=hidden_cols),
        "fc2": _dense(mlp["fc2"], rows=hidden_cols, row_scale=hidden_scale),
    }
    new_block = dataclasses.replace(
        block,
        qk_dim=qk.shape[1],
        v_dim=v.shape[1],
        mlp_dim=hidden.shape[1],
        qk_scale=block.scale,
        dwc_per_head=per_head,
    )
    new_p = {k: val for k, val in p.items() if k not in ("attn", "mlp")}
    return new_block, {**new_p, "attn": new_attn, "mlp": new_mlp}


def export(arch: Arch, variables, spec: PruneSpec | None = None) -> tuple[Arch, dict]:
    """(arch, {params, indicators[, similarity]}) -> (smaller arch, smaller params)."""
    spec = spec or PruneSpec()
    params = jax.tree.map(np.asarray, variables["params"])
    keep = kept_channels(variables, arch, spec)
    blocks, new_params = [], dict(params)
    for i, block in enumerate(arch.blocks):
        b, bp = _export_block(block, params[f"block_{i}"], keep[i])
        blocks.append(b)
        new_params[f"block_{i}"] = bp
    return arch.replace(blocks=tuple(blocks), reweight=False), new_params
