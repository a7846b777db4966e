"""Zero-padding an exported model's widths up to a multiple, for faster matmuls; same logits.

Pruning leaves widths such as 45 or 1099 that tile badly on every backend. `pad` adds channels
that reach nothing: zero q/k/v/fc1 columns and zero proj/fc2 rows (GELU(0) = 0, and a zero
q/k channel adds 0 to q . k), zero rows for extra gathered residual channels, and the padded
focused-attention channels of `export` (scale `PAD_SCALE`). The MACs counter counts the pads:
they are real work, kept only where they are faster. Which multiple is faster is measured
outside pruning, on the backend a run is on (`amap_jax.export_speed`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from amap_jax.models.arch import LINEAR, Arch, BlockArch
from amap_jax.pruning.export import PAD_SCALE

# One multiple for every width, or per block (attention: q/k, v, input; MLP: hidden, input).
Multiples = int | Sequence[tuple[int, int]]


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _grow(x, axis: int, groups: int, new: int, fill: float = 0.0) -> np.ndarray:
    """Pads each of `groups` equal chunks of `axis` to `new` entries with `fill`."""
    x = np.asarray(x)
    axis %= x.ndim
    shape = x.shape
    old = shape[axis] // groups
    if old == new:
        return x
    x = x.reshape(*shape[:axis], groups, old, *shape[axis + 1 :])
    width = [(0, 0)] * x.ndim
    width[axis + 1] = (0, new - old)
    x = np.pad(x, width, constant_values=fill)
    return x.reshape(*shape[:axis], groups * new, *shape[axis + 1 :])


def _gather(idx: tuple[int, ...], dim: int, multiple: int) -> tuple[tuple[int, ...], np.ndarray]:
    """More gathered residual channels (zero rows), up to a multiple or all `dim` of them:
    (new sorted indices, position of each old row among them)."""
    if not idx or multiple == 1:
        return idx, np.arange(len(idx) or dim)
    target = min(_up(len(idx), multiple), dim)
    extra = [c for c in range(dim) if c not in set(idx)][: target - len(idx)]
    new = tuple(sorted((*idx, *extra)))
    where = np.searchsorted(new, idx)
    return (() if len(new) == dim else new), where


def _rows(kernel, where: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, *np.shape(kernel)[1:]), np.float32)
    out[where] = kernel
    return out


def padded_block(b: BlockArch, dim: int, attn_m: int, mlp_m: int):
    """Block `b` at widths rounded up (attention's to `attn_m`, the MLP's to `mlp_m`), and
    where each old gathered input row lands."""
    attn_in, a_where = _gather(b.attn_in, dim, attn_m)
    mlp_in, m_where = _gather(b.mlp_in, dim, mlp_m)
    block = dataclasses.replace(
        b,
        qk_dim=_up(b.qk_dim, attn_m),
        v_dim=_up(b.v_dim, attn_m),
        mlp_dim=_up(b.mlp_dim, mlp_m),
        qk_scale=b.scale,  # the softmax scale of the real channels
        attn_in=attn_in,
        mlp_in=mlp_in,
    )
    return block, a_where, m_where


def _pad_block(b: BlockArch, dim: int, p: dict, attn_m: int, mlp_m: int):
    h = b.heads
    block, a_where, m_where = padded_block(b, dim, attn_m, mlp_m)
    qk, v, hidden = block.qk_dim, block.v_dim, block.mlp_dim
    a_rows = len(block.attn_in) or dim
    m_rows = len(block.mlp_in) or dim

    def dense(layer, cols_groups=None, cols=None, rows_groups=None, rows=None, gather=None):
        kernel, bias = np.asarray(layer["kernel"], np.float32), np.asarray(layer["bias"])
        if gather is not None:
            kernel = _rows(kernel, *gather)
        if rows is not None:
            kernel = _grow(kernel, 0, rows_groups, rows)
        if cols is not None:
            kernel, bias = _grow(kernel, -1, cols_groups, cols), _grow(bias, -1, cols_groups, cols)
        return {"kernel": kernel, "bias": np.asarray(bias, np.float32)}

    a, mlp = p["attn"], p["mlp"]
    new_a = dict(a)
    for name in ("q", "k"):
        new_a[name] = dense(a[name], h, qk, gather=(a_where, a_rows))
    new_a["v"] = dense(a["v"], h, v, gather=(a_where, a_rows))
    new_a["proj"] = dense(a["proj"], rows_groups=h, rows=v)
    if b.attn == LINEAR:
        new_a["positional_encoding"] = _grow(a["positional_encoding"], -1, h, qk)
        new_a["scale"] = _grow(a["scale"], -1, h, qk, fill=PAD_SCALE)
        groups = h if b.dwc_per_head else 1
        new_a["dwc"] = {
            "kernel": _grow(a["dwc"]["kernel"], -1, groups, v),
            "bias": _grow(a["dwc"]["bias"], -1, groups, v),
        }
    new_p = {
        **p,
        "attn": new_a,
        "mlp": {
            "fc1": dense(mlp["fc1"], 1, hidden, gather=(m_where, m_rows)),
            "fc2": dense(mlp["fc2"], rows_groups=1, rows=hidden),
        },
    }
    return block, new_p


def per_block(arch: Arch, multiples: Multiples) -> list[tuple[int, int]]:
    """The (attention, MLP) multiple of every block, checked."""
    if isinstance(multiples, int | np.integer):
        multiples = [(int(multiples), int(multiples))] * len(arch.blocks)
    out = [(int(a), int(m)) for a, m in multiples]
    if len(out) != len(arch.blocks):
        raise ValueError(f"{len(out)} padding multiples for {len(arch.blocks)} blocks")
    if any(m < 1 for pair in out for m in pair):
        raise ValueError(f"padding multiples must be >= 1, got {out}")
    return out


def pad(arch: Arch, params, multiple: Multiples) -> tuple[Arch, dict]:
    """Every per-head width (q/k, v, MLP hidden) and every gathered input rounded up to a
    multiple (one for all, or per block: attention, MLP) with channels that change no logit."""
    pairs = per_block(arch, multiple)
    params = jax.tree.map(np.asarray, params)
    if all(pair == (1, 1) for pair in pairs):
        return arch, params
    new, blocks = dict(params), []
    for i, (b, g, (am, mm)) in enumerate(zip(arch.blocks, arch.geometry(), pairs, strict=True)):
        block, new[f"block_{i}"] = _pad_block(b, g.dim, params[f"block_{i}"], am, mm)
        blocks.append(block)
    return arch.replace(blocks=tuple(blocks)), new
