"""Where a dense ViT block's time goes, ours vs timm, part by part on the same shapes.

  python -m bench.studies.dense_profile [--model S] [--batch 32] [--rounds 5] [--alternations 2]
      [--seconds 2] [--tag TAG]

Parts of block 0 of ViT-{Ti,S,B}/16 at 224 px (197 tokens): LayerNorm, the attention module
(q/k/v, scores, softmax, weights x values, output projection), the attention core alone (split
into heads, scores, softmax, weights x values, heads merged), the MLP (fc1, GELU, fc2), fc1
alone, GELU alone, the whole block, and the whole model. Ours are the project's modules
(`models.block`, `models.attention`) with block 0's parameters; timm's are `blocks[0]` of
`deit_*_patch16_224` and its parts, the core as its Attention runs it
(`F.scaled_dot_product_attention` when `fused_attn`). Each framework in its own process,
alternated (`sides.run_worker`).
Writes bench/results/dense_profile_<backend>[_TAG].json, .md and a PNG of ms per part.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np

from amap_jax.timing import interleaved
from bench import common, sides

PARTS = (
    "LayerNorm",
    "attention module",
    "attention core",
    "MLP",
    "fc1",
    "GELU",
    "block",
    "model",
)


def _shapes():
    from amap_jax.models.arch import vit_arch

    arch = vit_arch(sides.MODEL.value, image_size=sides.IMAGE.value)
    block, geometry = arch.blocks[0], arch.geometry()[0]
    tokens = (sides.IMAGE.value // 16) ** 2 + 1
    return arch, block, geometry, tokens


def jax_worker() -> dict:
    import flax.linen as nn
    import jax

    from amap_jax import models
    from amap_jax.models import block as block_lib
    from amap_jax.models.attention import Attention

    arch, blk, geo, n = _shapes()
    b, dim = common.BATCH.value, geo.dim
    key = jax.random.key(0)
    x = jax.random.normal(key, (b, n, dim))
    block = block_lib.blocks(arch, None, np.float32)[0]
    p = block.init(key, x)["params"]
    attn = Attention(blk, geo)
    qkv = jax.random.normal(key, (3, b, n, blk.heads * blk.qk_dim))
    hidden = jax.random.normal(key, (b, n, blk.mlp_dim))
    mlp = block_lib.Mlp(blk.mlp_dim, dim, arch.gelu_approximate)
    model = models.build(arch)
    images = jax.random.normal(key, (b, sides.IMAGE.value, sides.IMAGE.value, 3))
    model_params = model.init(key, models.dummy_input(arch))["params"]

    def core(q, k, v):  # `Attention`'s softmax path between the projections
        return attn.apply({}, q, k, v, None, method=Attention._softmax)[0]

    calls = {
        "LayerNorm": (jax.jit(nn.LayerNorm(arch.norm_eps).apply), {"params": p["norm1"]}, x),
        "attention module": (jax.jit(attn.apply), {"params": p["attn"]}, x),
        "attention core": (jax.jit(core), *qkv),
        "MLP": (jax.jit(mlp.apply), {"params": p["mlp"]}, x),
        "fc1": (jax.jit(nn.Dense(blk.mlp_dim).apply), {"params": p["mlp"]["fc1"]}, x),
        "GELU": (jax.jit(lambda h: nn.gelu(h, approximate=arch.gelu_approximate)), hidden),
        "block": (jax.jit(block.apply), {"params": p}, x),
        "model": (jax.jit(model.apply), {"params": model_params}, images),
    }
    fns = {k: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for k, (f, *a) in calls.items()}
    ips = interleaved(fns, common.SECONDS.value, common.ROUNDS.value, b)
    return {"images_per_s": ips, "jax": jax.__version__}


def torch_worker() -> dict:
    from bench import torch_env

    torch, timm = torch_env.load()
    import torch.nn.functional as F

    _, blk, geo, n = _shapes()
    b, dim = common.BATCH.value, geo.dim
    model = timm.create_model(
        sides.TIMM[sides.MODEL.value], pretrained=False, img_size=sides.IMAGE.value
    ).eval()
    block = model.blocks[0]
    attn = block.attn
    x = torch.randn(b, n, dim)
    qkv = torch.randn(b, n, 3 * blk.heads * blk.qk_dim)
    hidden = torch.randn(b, n, blk.mlp_dim)
    images = torch.randn(b, 3, sides.IMAGE.value, sides.IMAGE.value)

    def core(qkv):  # what timm's Attention.forward does between qkv and proj
        q, k, v = qkv.reshape(b, n, 3, blk.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if getattr(attn, "fused_attn", False):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(b, n, -1)

    calls = {
        "LayerNorm": (block.norm1, x),
        "attention module": (attn, x),
        "attention core": (core, qkv),
        "MLP": (block.mlp, x),
        "fc1": (block.mlp.fc1, x),
        "GELU": (block.mlp.act, hidden),
        "block": (block, x),
        "model": (model, images),
    }

    def run(f, *a):
        with torch.inference_mode():
            f(*a)

    fns = {k: (lambda f=f, a=a: run(f, *a)) for k, (f, *a) in calls.items()}
    ips = interleaved(fns, common.SECONDS.value, common.ROUNDS.value, b)
    return {
        "images_per_s": ips,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "fused_attn": bool(getattr(attn, "fused_attn", False)),
    }


def summarize(runs: dict[str, list[dict]], batch: int) -> list[dict]:
    """ms per call (median over every round) of each part, and ours / timm."""
    rows = []
    for part in PARTS:
        ms = {
            side: 1e3 * batch / float(np.median([v for r in rs for v in r["images_per_s"][part]]))
            for side, rs in runs.items()
        }
        rows.append(
            {
                "part": part,
                "ours_ms": round(ms["jax"], 3),
                "timm_ms": round(ms["torch"], 3),
                "ours_over_timm_time": round(ms["jax"] / ms["torch"], 3),
            }
        )
    block = {r["part"]: r for r in rows}["block"]
    for r in rows:
        if r["part"] != "model":
            r["ours_share_of_block"] = round(r["ours_ms"] / block["ours_ms"], 3)
            r["timm_share_of_block"] = round(r["timm_ms"] / block["timm_ms"], 3)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['model']} block 0, batch {meta['batch']}, {meta['tokens']} tokens, float32, "
        f"{meta['alternations']} alternations x {meta['rounds']} rounds "
        f"({meta['device']}, {meta['cpus']} CPUs; timm fused_attn={meta['fused_attn']})",
        "",
        "| part | ours ms | timm ms | ours / timm time | share of the block, ours / timm |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        share = (
            f"{r['ours_share_of_block']:.2f} / {r['timm_share_of_block']:.2f}"
            if "ours_share_of_block" in r
            else "-"
        )
        lines.append(
            f"| {r['part']} | {r['ours_ms']:.2f} | {r['timm_ms']:.2f} | "
            f"{r['ours_over_timm_time']:.2f} | {share} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["part"] != "model"]
    ys = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.barh(ys - 0.2, [r["ours_ms"] for r in rows], 0.4, label="ours (jax)")
    ax.barh(ys + 0.2, [r["timm_ms"] for r in rows], 0.4, label="timm (torch)")
    ax.set_yticks(ys, [r["part"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms per call")
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(_):
    if sides.serve(jax_worker, torch_worker):
        return
    import jax

    runs = sides.alternate("bench.studies.dense_profile")
    rows = summarize(runs, common.BATCH.value)
    meta = {
        "model": f"ViT-{sides.MODEL.value}/16 (timm {sides.TIMM[sides.MODEL.value]})",
        "image_size": sides.IMAGE.value,
        "tokens": _shapes()[3],
        "batch": common.BATCH.value,
        "rounds": common.ROUNDS.value,
        "alternations": sides.ALTERNATIONS.value,
        "fused_attn": runs["torch"][0]["fused_attn"],
        "device": str(jax.devices()[0].device_kind),
        "cpus": common.cpus(),
        "runs": runs,
    }
    name = f"dense_profile_{jax.default_backend()}{common.suffix()}"
    md = markdown(rows, meta)
    common.write(name, rows, meta, md)
    plot(rows, os.path.join(common.out_dir(), f"{name}.png"), md.splitlines()[0])
    print(md)


if __name__ == "__main__":
    common.run(main)
