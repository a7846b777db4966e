"""Zero-padding an exported model's widths up to a multiple, for faster matmuls; same logits.

Pruning leaves widths such as 45 or 1099 that tile badly on every backend. `pad` adds channels
that reach nothing: zero q/k/v/fc1 columns and zero proj/fc2 rows (GELU(0) = 0, and a zero
q/k channel adds 0 to q . k), zero rows for extra gathered residual channels, and the padded
focused-attention channels of `export` (scale `PAD_SCALE`). The MACs counter counts the pads:
they are real work, kept only where they are faster. Which multiple is faster depends on the
backend and the shapes, so `fastest_multiple` measures the candidates on this backend and
caches the choice per (backend, device kind, widths).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np

from amap_jax.models.arch import LINEAR, Arch, BlockArch
from amap_jax.pruning.export import PAD_SCALE

CANDIDATES = (1, 8, 16, 32, 64)
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "amap_jax", "padding.json")


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


def _pad_block(b: BlockArch, dim: int, p: dict, m: int) -> tuple[BlockArch, dict]:
    h = b.heads
    qk, v, hidden = _up(b.qk_dim, m), _up(b.v_dim, m), _up(b.mlp_dim, m)
    attn_in, a_where = _gather(b.attn_in, dim, m)
    mlp_in, m_where = _gather(b.mlp_in, dim, m)
    a_rows = len(attn_in) or dim
    m_rows = len(mlp_in) or dim

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
    block = dataclasses.replace(
        b,
        qk_dim=qk,
        v_dim=v,
        mlp_dim=hidden,
        qk_scale=b.scale,  # the softmax scale of the real channels
        attn_in=attn_in,
        mlp_in=mlp_in,
    )
    return block, new_p


def pad(arch: Arch, params, multiple: int) -> tuple[Arch, dict]:
    """Every per-head width (q/k, v, MLP hidden) and every gathered input rounded up to a
    multiple of `multiple` with channels that change no logit."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    params = jax.tree.map(np.asarray, params)
    if multiple == 1:
        return arch, params
    new, blocks = dict(params), []
    for i, (b, g) in enumerate(zip(arch.blocks, arch.geometry(), strict=True)):
        block, new[f"block_{i}"] = _pad_block(b, g.dim, params[f"block_{i}"], multiple)
        blocks.append(block)
    return arch.replace(blocks=tuple(blocks)), new


def _key(arch: Arch, batch: int) -> str:
    backend = jax.default_backend()
    kind = jax.devices()[0].device_kind
    digest = hashlib.sha256(repr(arch).encode()).hexdigest()[:16]
    return f"{backend}|{kind}|batch {batch}|{digest}"


def fastest_multiple(
    arch: Arch,
    params,
    batch: int,
    *,
    candidates: tuple[int, ...] = CANDIDATES,
    seconds: float = 1.0,
    rounds: int = 3,
    cache: str | None = CACHE,
) -> tuple[int, dict[int, float]]:
    """The candidate multiple whose padded model runs fastest here (images/s, median over
    `rounds` interleaved rounds), and each candidate's images/s; cached per backend, device
    kind, batch and architecture."""
    from amap_jax import models
    from amap_jax.train.evaluate import throughput

    key = _key(arch, batch)
    stored = _read(cache)
    if key in stored:
        hit = stored[key]
        return hit["multiple"], {int(k): v for k, v in hit["images_per_s"].items()}
    padded = {m: pad(arch, params, m) for m in candidates}
    speeds: dict[int, list[float]] = {m: [] for m in candidates}
    for _ in range(rounds):
        for m, (a, p) in padded.items():
            speeds[m].append(throughput(models.build(a), {"params": p}, a, batch, seconds=seconds))
    median = {m: float(np.median(s)) for m, s in speeds.items()}
    best = max(median, key=median.get)
    if cache:
        stored[key] = {"multiple": best, "images_per_s": median}
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(stored, f, indent=1)
        os.replace(tmp, cache)
    return best, median


def _read(cache: str | None) -> dict:
    if not cache or not os.path.exists(cache):
        return {}
    try:
        with open(cache) as f:
            return json.load(f)
    except (OSError, ValueError):  # a broken cache is measured again
        return {}
