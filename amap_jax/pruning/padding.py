"""Zero-padding an exported model's widths up to a multiple, for faster matmuls; same logits.

Pruning leaves widths such as 45 or 1099 that tile badly on every backend. `pad` adds channels
that reach nothing: zero q/k/v/fc1 columns and zero proj/fc2 rows (GELU(0) = 0, and a zero
q/k channel adds 0 to q . k), zero rows for extra gathered residual channels, and the padded
focused-attention channels of `export` (scale `PAD_SCALE`). The MACs counter counts the pads:
they are real work, kept only where they are faster. Which multiple is faster depends on the
backend and the shapes, so it is measured here: `fastest_multiples` times each layer shape (a
block's attention, its MLP) alone at every candidate and caches the choice per backend, device
kind, jax version, layer code and shape, so that a block's attention and MLP may get different
multiples and blocks of one shape are measured once. `measured` then times the whole model
unpadded, padded per layer and padded to each single multiple, and keeps the fastest.
`fastest_kernels` likewise times a model under each CPU kernel set (`xla_cpu.SETS`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from amap_jax import models as models_pkg
from amap_jax import timing, xla_cpu
from amap_jax.models.arch import LINEAR, Arch, BlockArch
from amap_jax.pruning.export import PAD_SCALE

CANDIDATES = (1, 8, 16, 32, 64)
# One multiple for every width, or per block (attention: q/k, v, input; MLP: hidden, input).
Multiples = int | Sequence[tuple[int, int]]
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


def _padded(b: BlockArch, dim: int, attn_m: int, mlp_m: int):
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
    block, a_where, m_where = _padded(b, dim, attn_m, mlp_m)
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


def _device() -> str:
    """What a timing holds for besides the shapes: the device, the compiler and its flags, and
    the layers' code (a change to any makes earlier timings stale)."""
    return (
        f"{jax.default_backend()}|{jax.devices()[0].device_kind}|jax {jax.__version__}"
        f"|XLA_FLAGS {os.environ.get('XLA_FLAGS', '')}|layers {_layers_digest()}"
    )


@functools.cache
def _layers_digest() -> str:
    folder = os.path.dirname(models_pkg.__file__)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


def _key(arch: Arch, batch: int) -> str:
    digest = hashlib.sha256(repr(arch).encode()).hexdigest()[:16]
    return f"{_device()}|batch {batch}|{digest}"


def _part(arch: Arch, b: BlockArch, g, part: str) -> str:
    """What one layer's speed depends on besides its padding (not which channels it keeps)."""
    if part == "mlp":
        return (
            f"mlp in {len(b.mlp_in) or g.dim}/{g.dim} hidden {b.mlp_dim} tokens {g.tokens} "
            f"gelu_approximate {arch.gelu_approximate}"
        )
    return (
        f"attention {b.attn} in {len(b.attn_in) or g.dim}/{g.dim} heads {b.heads} qk {b.qk_dim} "
        f"v {b.v_dim} calls {g.windows}x{g.window_tokens} grid {g.grid} shifted {b.shift > 0} "
        f"dwc_per_head {b.dwc_per_head} kernel {arch.kernel_size}"
    )


def layer_inputs(arch: Arch, b: BlockArch, g, part: str, batch: int, dtype=np.float32):
    """One layer ("attention" or "mlp") of block shape `b` computing in `dtype`, random
    variables for it and a random input: (module, variables, x)."""
    from amap_jax.models.attention import Attention
    from amap_jax.models.block import Mlp

    if part == "mlp":
        module = Mlp(b.mlp_dim, g.dim, arch.gelu_approximate, dtype)
        shape = (batch, g.tokens, len(b.mlp_in) or g.dim)
    else:
        module = Attention(b, g, arch.focusing_factor, arch.kernel_size, dtype)
        shape = (batch * g.windows, g.window_tokens, len(b.attn_in) or g.dim)
    x = jax.random.normal(jax.random.key(0), shape)
    return module, module.init(jax.random.key(1), x), x


def _layer(arch: Arch, b: BlockArch, g, part: str, batch: int):
    """One layer alone on random inputs and weights, as a blocking call."""
    module, variables, x = layer_inputs(arch, b, g, part, batch)
    fn = jax.jit(module.apply)
    return lambda: jax.block_until_ready(fn(variables, x))


def fastest_multiples(
    arch: Arch,
    batch: int,
    *,
    candidates: tuple[int, ...] = CANDIDATES,
    seconds: float = 0.3,
    rounds: int = 3,
    cache: str | None = CACHE,
) -> tuple[list[tuple[int, int]], dict[str, dict]]:
    """Per block, the (attention, MLP) multiples whose padded layer runs fastest here.

    Each layer shape is timed alone at every candidate (images/s, median over `rounds`
    interleaved rounds), once per shape, and cached per backend, device kind, batch and shape;
    also returns each shape's measurement.
    """
    stored, seen, pairs = _read(cache), {}, []
    for b, g in zip(arch.blocks, arch.geometry(), strict=True):
        pair = []
        for part in ("attention", "mlp"):
            key = f"{_device()}|batch {batch}|{_part(arch, b, g, part)}"
            if key not in stored:
                fns = {
                    m: _layer(arch, _padded(b, g.dim, m, m)[0], g, part, batch) for m in candidates
                }
                median = {
                    m: float(np.median(v))
                    for m, v in timing.interleaved(fns, seconds, rounds, batch).items()
                }
                stored[key] = {"multiple": max(median, key=median.get), "images_per_s": median}
                if cache:
                    _write(cache, stored)
            hit = stored[key]
            seen[key] = {
                "multiple": int(hit["multiple"]),
                "images_per_s": {int(k): v for k, v in hit["images_per_s"].items()},
            }
            pair.append(seen[key]["multiple"])
        pairs.append(tuple(pair))
    return pairs, seen


def rates(models: dict, batch: int, *, seconds: float, rounds: int) -> dict[str, list[float]]:
    """Images/s per round of each {name: (arch, params[, CPU kernel set])} forward pass on one
    random batch, the models interleaved within each round."""
    from amap_jax import models as models_lib

    arch = next(iter(models.values()))[0]
    x = jax.random.normal(
        jax.random.key(0), (batch, arch.image_size, arch.image_size, arch.in_chans)
    )

    def forward(a, p, kernels="default"):
        fn = xla_cpu.jit(models_lib.build(a).apply, kernels)
        return lambda: jax.block_until_ready(fn({"params": p}, x))

    return timing.interleaved({k: forward(*m) for k, m in models.items()}, seconds, rounds, batch)


def fastest_kernels(
    arch: Arch,
    params,
    batch: int,
    *,
    seconds: float = 1.0,
    rounds: int = 3,
    cache: str | None = CACHE,
) -> tuple[str, dict[str, float]]:
    """The CPU kernel set (`xla_cpu.SETS`) this model's forward pass runs fastest with here,
    and each usable set's images/s over the default's (median of same-round ratios). Cached
    per backend, device kind, batch and architecture; "default" off CPU."""
    names = xla_cpu.usable()
    if len(names) == 1:
        return names[0], {}
    gains = {"default": 1.0} | _gains(
        f"{_key(arch, batch)}|kernels {','.join(names)}",
        lambda: {name: (arch, params, name) for name in names},
        "default",
        batch,
        seconds=seconds,
        rounds=rounds,
        cache=cache,
    )
    return max(gains, key=gains.get), gains


def _gains(
    key: str, models, base: str, batch: int, *, seconds: float, rounds: int, cache: str | None
) -> dict[str, float]:
    """Whole-model images/s of every model in `models()` but `base`, over `base`'s: the median
    of same-round ratios over `rounds` interleaved rounds of `rates`, cached under `key`."""
    stored = _read(cache)
    if key not in stored:
        ips = rates(models(), batch, seconds=seconds, rounds=rounds)
        ratios = {
            name: float(np.median([a / b for a, b in zip(v, ips[base], strict=True)]))
            for name, v in ips.items()
            if name != base
        }
        stored[key] = {"gains": ratios}
        if cache:
            _write(cache, stored)
    return stored[key]["gains"]


def measured(
    arch: Arch,
    params,
    batch: int,
    *,
    candidates: tuple[int, ...] = CANDIDATES,
    seconds: float = 1.0,
    rounds: int = 3,
    cache: str | None = CACHE,
) -> tuple[Multiples, dict]:
    """What `export_pad=0` pads to: of the per-layer choice of `fastest_multiples` and each
    single candidate multiple, the padded model that runs fastest here as a whole, if faster
    than the unpadded one (median of same-round ratios over `rounds` interleaved rounds), else
    1. A layer timed alone can mislead (tiny layers, fusion across layers), so the whole model
    decides. Cached per backend, device kind, batch and architecture; also returns the
    measurements (`gains`: each option's images/s over the unpadded model's)."""
    pairs, shapes = fastest_multiples(arch, batch, candidates=candidates, cache=cache)
    options: dict[str, Multiples] = {f"x{m}": m for m in candidates if m > 1}
    if len(set(pairs)) > 1 or pairs[0][0] != pairs[0][1]:
        options["per layer"] = pairs  # not one multiple for every width
    report: dict = {"per_layer": pairs, "shapes": shapes, "gains": {}, "choice": "unpadded"}
    if not options:
        return 1, report
    report["gains"] = gains = _gains(
        f"{_key(arch, batch)}|options {sorted(options.items(), key=str)}",
        lambda: (
            {"unpadded": (arch, params)}
            | {name: pad(arch, params, m) for name, m in options.items()}
        ),
        "unpadded",
        batch,
        seconds=seconds,
        rounds=rounds,
        cache=cache,
    )
    best = max(gains, key=gains.get)
    if gains[best] <= 1.0:
        return 1, report
    report["choice"] = best
    return options[best], report


def _write(cache: str, stored: dict) -> None:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(stored, f, indent=1)
    os.replace(tmp, cache)


def _read(cache: str | None) -> dict:
    if not cache or not os.path.exists(cache):
        return {}
    try:
        with open(cache) as f:
            return json.load(f)
    except (OSError, ValueError):  # a broken cache is measured again
        return {}
