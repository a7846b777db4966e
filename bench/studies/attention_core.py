"""Softmax attention's core normalised after weights x values (as `models.attention` does it)
vs normalised per key (the softmax as the papers write it).

  python -m bench.studies.attention_core [--batch 32] [--head_widths 64,45,33] [--rounds 5]
      [--seconds 2] [--tag TAG]

Dividing the exponentials by their sum before the product costs one divide per key
(B x H x N x N); dividing the product costs one per output channel (B x H x N x d) and gives
the same result up to rounding. Both are timed, forward and gradient (with respect to q, k
and v), on ViT-S/16 shapes (6 heads, 197 tokens) at each per-head width, interleaved; "ours"
is the model's own `Attention._softmax`.
Writes bench/results/attention_core_<backend>[_TAG].json and .md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from amap_jax.models.arch import vit_arch
from amap_jax.models.attention import Attention, _heads, _merge
from amap_jax.timing import interleaved
from bench import common

_WIDTHS = flags.DEFINE_list("head_widths", ["64", "45", "33"], "Per-head q/k/v widths.")
_HEADS, _TOKENS = 6, 197


def per_key(q, k, v, heads: int, scale: float):
    """The softmax normalised before the product."""
    q, k, v = (_heads(t, heads) for t in (q, k, v))
    weights = jax.nn.softmax(jnp.matmul(q * scale, k.swapaxes(-1, -2)), axis=-1)
    return _merge(jnp.matmul(weights, v))


def cores(width: int):
    """{name: forward(q, k, v)} at per-head `width`."""
    arch = vit_arch("S")
    block = dataclasses.replace(
        arch.blocks[0], qk_dim=width, v_dim=width, qk_scale=arch.blocks[0].scale
    )
    attn = Attention(block, arch.geometry()[0])

    def ours(q, k, v):
        return attn.apply({}, q, k, v, method=Attention._softmax)[0]

    return {"ours": ours, "per key": lambda q, k, v: per_key(q, k, v, block.heads, block.scale)}


def measure(width: int, batch: int, seconds: float, rounds: int) -> list[dict]:
    keys = jax.random.split(jax.random.key(width), 3)
    q, k, v = (jax.random.normal(key, (batch, _TOKENS, _HEADS * width)) for key in keys)
    fns, outputs = {}, {}
    for name, core in cores(width).items():
        forward = jax.jit(core)
        loss = lambda q, k, v, f=core: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
        gradient = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        fns[("forward", name)] = lambda f=forward: jax.block_until_ready(f(q, k, v))
        fns[("gradient", name)] = lambda f=gradient: jax.block_until_ready(f(q, k, v))
        outputs[("forward", name)] = forward(q, k, v)
        outputs[("gradient", name)] = gradient(q, k, v)
    ips = interleaved(fns, seconds, rounds, batch)
    rows = []
    for kind in ("forward", "gradient"):
        ms = {n: 1e3 * batch / float(np.median(ips[(kind, n)])) for n in ("ours", "per key")}
        gaps = jax.tree.map(
            lambda a, b: jnp.max(jnp.abs(a - b)),
            outputs[(kind, "ours")],
            outputs[(kind, "per key")],
        )
        diff = max(jax.tree.leaves(gaps))
        rows.append(
            {
                "width": width,
                "pass": kind,
                "ours_ms": round(ms["ours"], 2),
                "per_key_ms": round(ms["per key"], 2),
                "per_key_over_ours_time": round(ms["per key"] / ms["ours"], 3),
                "max_abs_diff": float(diff),
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Softmax attention core, ViT-S/16 shapes ({_HEADS} heads, {_TOKENS} tokens), batch "
        f"{meta['batch']}, float32, {meta['rounds']} rounds "
        f"({meta['device']}, {meta['cpus']} CPUs)",
        "",
        "| per-head width | pass | normalised after the product, ms | per key, ms | "
        "per key / after, time | max abs difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['pass']} | {r['ours_ms']:.1f} | {r['per_key_ms']:.1f} | "
            f"{r['per_key_over_ours_time']:.2f} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(_):
    rows = []
    for width in map(int, _WIDTHS.value):
        rows += measure(width, common.BATCH.value, common.SECONDS.value, common.ROUNDS.value)
        print(common.table(rows[-2:], list(rows[-1])), flush=True)
    meta = {
        "batch": common.BATCH.value,
        "rounds": common.ROUNDS.value,
        "device": str(jax.devices()[0].device_kind),
        "cpus": common.cpus(),
    }
    name = f"attention_core_{jax.default_backend()}{common.suffix()}"
    md = markdown(rows, meta)
    path = common.write(name, rows, meta, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.defaults(seconds=2.0)
    common.run(main)
