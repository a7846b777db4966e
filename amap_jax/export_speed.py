"""The export's fastest layout on the running backend: padding multiples and XLA CPU kernel
sets, timed and cached.

Which padding multiple (`pruning.padding`) is faster depends on the backend and the shapes, so
it is measured: `fastest_multiples` times each layer shape (a block's attention, its MLP) alone
at every candidate and caches the choice per backend, device kind, jax version, layer code and
shape, so that a block's attention and MLP may get different multiples and blocks of one shape
are measured once. `measured` then times the whole model unpadded, padded per layer and padded
to each single multiple, and keeps the fastest. `fastest_kernels` likewise times a model under
each CPU kernel set (`xla_cpu.SETS`). The latency model (`amap_jax.latency`) keys its cache the
same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import numpy as np

from amap_jax import models as models_pkg
from amap_jax import timing, xla_cpu
from amap_jax.models.arch import Arch, BlockArch
from amap_jax.models.attention import Attention
from amap_jax.models.block import Mlp
from amap_jax.pruning import padding
from amap_jax.pruning.padding import Multiples

CANDIDATES = (1, 8, 16, 32, 64)
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "amap_jax", "padding.json")


def device_key() -> str:
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


def cache_key(arch: Arch, batch: int) -> str:
    """A whole model's timing holds for this device and batch and exactly this architecture."""
    digest = hashlib.sha256(repr(arch).encode()).hexdigest()[:16]
    return f"{device_key()}|batch {batch}|{digest}"


def part_key(arch: Arch, b: BlockArch, g, part: str) -> str:
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
    stored, seen, pairs = read_cache(cache), {}, []
    for b, g in zip(arch.blocks, arch.geometry(), strict=True):
        pair = []
        for part in ("attention", "mlp"):
            key = f"{device_key()}|batch {batch}|{part_key(arch, b, g, part)}"
            if key not in stored:
                fns = {
                    m: _layer(arch, padding.padded_block(b, g.dim, m, m)[0], g, part, batch)
                    for m in candidates
                }
                median = {
                    m: float(np.median(v))
                    for m, v in timing.interleaved(fns, seconds, rounds, batch).items()
                }
                stored[key] = {"multiple": max(median, key=median.get), "images_per_s": median}
                if cache:
                    write_cache(cache, stored)
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
    arch = next(iter(models.values()))[0]
    x = jax.random.normal(
        jax.random.key(0), (batch, arch.image_size, arch.image_size, arch.in_chans)
    )

    def forward(a, p, kernels="default"):
        fn = xla_cpu.jit(models_pkg.build(a).apply, kernels)
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
        f"{cache_key(arch, batch)}|kernels {','.join(names)}",
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
    stored = read_cache(cache)
    if key not in stored:
        ips = rates(models(), batch, seconds=seconds, rounds=rounds)
        ratios = {
            name: float(np.median([a / b for a, b in zip(v, ips[base], strict=True)]))
            for name, v in ips.items()
            if name != base
        }
        stored[key] = {"gains": ratios}
        if cache:
            write_cache(cache, stored)
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
        f"{cache_key(arch, batch)}|options {sorted(options.items(), key=str)}",
        lambda: (
            {"unpadded": (arch, params)}
            | {name: padding.pad(arch, params, m) for name, m in options.items()}
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


def write_cache(cache: str, stored: dict) -> None:
    """Replaced whole (a temporary file renamed), so that a killed run leaves the old cache."""
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(stored, f, indent=1)
    os.replace(tmp, cache)


def read_cache(cache: str | None) -> dict:
    if not cache or not os.path.exists(cache):
        return {}
    try:
        with open(cache) as f:
            return json.load(f)
    except (OSError, ValueError):  # a broken cache is measured again
        return {}
