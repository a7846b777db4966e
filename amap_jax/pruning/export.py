"""Export: rewrite a model with site multipliers into a smaller dense model with the same logits.

Generic over methods: a method only says what it multiplies at each site (`models.block`). A zero
multiplier removes the channel; every other multiplier is folded into the neighbouring kernel, so
nothing of the pruning machinery is left over:

| site      | removed                                  | multiplier folded into            |
|-----------|------------------------------------------|-----------------------------------|
| `attn_in` | LayerNorm-1 output gathered; q/k/v rows  | q/k/v kernel rows                 |
| `qk`      | q/k columns, FLatten `scale`, pos-enc    | q columns (softmax attention)     |
| `v`       | v columns, proj rows, depthwise kernels  | proj rows                         |
| `mlp_in`  | LayerNorm-2 output gathered; fc1 rows    | fc1 rows                          |
| `hidden`  | fc1 columns, fc2 rows                    | fc2 rows                          |

Where heads keep different counts, every head is padded to the widest with channels that reach
nothing (the honest cost of not balancing heads). The softmax scale of the dense model is kept.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from amap_jax.models.arch import LINEAR, Arch, BlockArch

# softplus(PAD_SCALE) ~ PAD_SCALE: a padded focused-attention channel holds 1e-6 / 1e4 = 1e-10,
# whose cube and squared norm vanish next to any real channel.
PAD_SCALE = 1e4

Multipliers = list  # per block: {site: [heads, width] array}; a missing site keeps everything


@dataclasses.dataclass(frozen=True)
class Kept:
    """One site's surviving channels: `index` [heads, k] within each head, `pad` marks the
    channels a head holds only to reach the widest head's count, `scale` the multiplier to fold
    (0 on pads)."""

    index: np.ndarray
    pad: np.ndarray
    scale: np.ndarray
    width: int  # the site's width per head before export

    @property
    def flat(self) -> np.ndarray:
        """Indices over all heads of a flat [heads * width] axis."""
        return (self.index + self.width * np.arange(self.index.shape[0])[:, None]).reshape(-1)


def kept(multiplier) -> Kept:
    """Non-zero channels of a [heads, width] multiplier, padded to the widest head."""
    m = np.asarray(multiplier, np.float32)
    keep = m != 0
    width = int(keep.sum(-1).max())
    if width == 0:
        raise ValueError("a site keeps no channel at all; a method must keep at least one")
    rows, pads = [], []
    for row in keep:
        k, dropped = np.flatnonzero(row), np.flatnonzero(~row)
        rows.append(np.concatenate([k, dropped[: width - len(k)]]))
        pads.append(np.arange(width) >= len(k))
    index, pad = np.stack(rows), np.stack(pads)
    scale = np.where(pad, 0.0, np.take_along_axis(m, index, -1)).astype(np.float32)
    return Kept(index, pad, scale, m.shape[1])


def _kept_sites(multipliers: dict) -> dict[str, Kept]:
    return {site: kept(m) for site, m in multipliers.items()}


def _inputs(old: tuple[int, ...], k: Kept | None, dim: int) -> tuple[int, ...]:
    """Residual channels that still feed a layer; () when all of them do."""
    if k is None:
        return old
    base = np.asarray(old) if old else np.arange(dim)
    new = base[k.index[0]]
    return () if len(new) == dim else tuple(int(c) for c in new)


def _block_arch(block: BlockArch, dim: int, keep: dict[str, Kept]) -> BlockArch:
    w = lambda site, now: keep[site].index.shape[1] if site in keep else now  # noqa: E731
    v = keep.get("v")
    per_head = block.dwc_per_head or (
        block.attn == LINEAR and v is not None and not np.all(v.index == v.index[:1])
    )
    return dataclasses.replace(
        block,
        qk_dim=w("qk", block.qk_dim),
        v_dim=w("v", block.v_dim),
        mlp_dim=w("hidden", block.mlp_dim),
        qk_scale=block.scale,
        dwc_per_head=per_head,
        attn_in=_inputs(block.attn_in, keep.get("attn_in"), dim),
        mlp_in=_inputs(block.mlp_in, keep.get("mlp_in"), dim),
    )


def pruned_arch(arch: Arch, multipliers: Multipliers) -> Arch:
    """The architecture `export` produces, without touching weights (for MACs before export)."""
    blocks = tuple(
        _block_arch(b, g.dim, _kept_sites(m))
        for b, g, m in zip(arch.blocks, arch.geometry(), multipliers, strict=True)
    )
    return arch.replace(blocks=blocks)


def _dense(p, rows: Kept | None = None, cols: Kept | None = None, col_scale=False):
    """A Dense layer's params with kept input rows (scaled) and kept output columns (scaled only
    if `col_scale`; padded columns are zeroed)."""
    kernel, bias = np.asarray(p["kernel"], np.float32), np.asarray(p["bias"], np.float32)
    if rows is not None:
        kernel = kernel[rows.flat] * rows.scale.reshape(-1)[:, None]
    if cols is not None:
        kernel, bias = kernel[:, cols.flat], bias[cols.flat]
        s = cols.scale.reshape(-1) if col_scale else np.where(cols.pad.reshape(-1), 0.0, 1.0)
        kernel, bias = kernel * s[None, :], bias * s
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def _export_block(block: BlockArch, p, keep: dict[str, Kept]) -> dict:
    attn, mlp = p["attn"], p["mlp"]
    a_in, qk, v = keep.get("attn_in"), keep.get("qk"), keep.get("v")
    linear = block.attn == LINEAR
    if linear and qk is not None and not np.all(qk.scale[~qk.pad] == 1.0):
        raise ValueError("focused linear attention takes 0/1 multipliers at the qk site only")
    new_attn = {
        "q": _dense(attn["q"], a_in, qk, col_scale=True),  # q . k: the q side carries it
        "k": _dense(attn["k"], a_in, qk),
        "v": _dense(attn["v"], a_in, v, col_scale=v is None),
        "proj": _dense(attn["proj"], v),
    }
    if "relative_position_bias_table" in attn:  # per head: untouched, heads are never removed
        new_attn["relative_position_bias_table"] = np.asarray(attn["relative_position_bias_table"])
    if linear:
        cols = qk.flat if qk is not None else slice(None)
        pad = qk.pad.reshape(-1) if qk is not None else False
        pos = np.array(attn["positional_encoding"])[:, cols]
        new_attn["positional_encoding"] = np.where(pad, 0.0, pos).astype(np.float32)
        new_attn["scale"] = np.where(pad, PAD_SCALE, np.asarray(attn["scale"])[cols])
        dwc = attn["dwc"]
        if v is None:
            sel = slice(None)
        elif block.dwc_per_head:
            sel = v.flat
        elif np.all(v.index == v.index[:1]):
            sel = v.index[0]
        else:  # heads keep different rows of the shared kernel: one kernel per head
            sel = v.index.reshape(-1)
        new_attn["dwc"] = {
            "kernel": np.asarray(dwc["kernel"])[..., sel],
            "bias": np.asarray(dwc["bias"])[sel],
        }
    hidden = keep.get("hidden")
    new_mlp = {
        "fc1": _dense(mlp["fc1"], keep.get("mlp_in"), hidden),
        "fc2": _dense(mlp["fc2"], hidden),
    }
    # Only the model's own params: whatever a method kept under the block (scales) is folded.
    return {"norm1": p["norm1"], "norm2": p["norm2"], "attn": new_attn, "mlp": new_mlp}


def export(arch: Arch, params, multipliers: Multipliers) -> tuple[Arch, dict]:
    """(arch, params, per-block site multipliers) -> (smaller arch, its params)."""
    params = jax.tree.map(np.asarray, params)
    new_params, blocks = dict(params), []
    for i, (block, g) in enumerate(zip(arch.blocks, arch.geometry(), strict=True)):
        keep = _kept_sites(multipliers[i])
        blocks.append(_block_arch(block, g.dim, keep))
        new_params[f"block_{i}"] = _export_block(block, params[f"block_{i}"], keep)
    return arch.replace(blocks=tuple(blocks)), new_params
