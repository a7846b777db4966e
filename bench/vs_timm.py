"""Ours vs timm: the dense ViT, and the pruned one at the same widths as Torch-Pruning's.

  python -m bench.vs_timm [--model S] [--batch 32] [--widths 45:1099,33:794] [--rounds 5]
      [--alternations 2] [--seconds 4] [--dtype float32] [--kernels measure] [--tag TAG]

Widths are `per-head q/k/v width : MLP hidden` in every block: 45:1099 and 33:794 are what
Torch-Pruning gives timm's DeiT-S at -30% and -50% MACs. The torch side is timm's
`deit_{tiny,small,base}_patch16_224` cut to those widths with Torch-Pruning's structural
pruning functions (`tp.prune_linear_out_channels` / `in_channels` on qkv, proj, fc1, fc2,
what its dependency graph applies to a ViT) and `head_dim` set to match; the jax side is our
ViT and its export at the same widths, unpadded and padded as `export_pad=0` pads it (the
whole model timed unpadded, padded per layer shape and to each single multiple, the fastest
kept: `amap_jax.export_speed.measured`), each compiled with the CPU kernel set measured
fastest for it (`--kernels`, `amap_jax.xla_cpu`). Weights are random: speed does not depend on
them.

Each framework runs in its own process (in one process XLA's and torch's thread pools compete),
jax and torch alternated `alternations` times; a process times each of its models for
`seconds` per round, models interleaved, `rounds` rounds. Reported: the median over all
rounds, and the range of the per-alternation values. The ideal speedup is dense MACs / pruned
MACs; a speedup is the median over all rounds of pruned / dense images/s in the same round.
Writes bench/results/vs_timm_<backend>[_TAG].json, .md and a PNG of speedup vs MACs
(`--rebuild` rebuilds them from the JSON).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags

# common: --tag (it imports jax, which the torch worker never initialises); sides: shared flags
from amap_jax.timing import interleaved
from bench import common, sides

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_PAD = flags.DEFINE_list("pad_candidates", ["1", "8", "16", "32", "64"], "Padding multiples.")
common.check_list(_PAD, int, lambda m: m >= 1, "padding multiples (integers >= 1)")
_REBUILD = flags.DEFINE_bool("rebuild", False, "Rebuild the report from the JSON (no timing).")


def _widths() -> list[tuple[int, int]]:
    return [tuple(int(x) for x in w.split(":")) for w in sides.WIDTHS.value]


# -- jax side ------------------------------------------------------------------------------


def _our_archs():
    from amap_jax.models.arch import vit_arch

    dense = vit_arch(sides.MODEL.value, image_size=sides.IMAGE.value)
    pruned = {f"{h}:{m}": common.at_widths(dense, h, m) for h, m in _widths()}
    return dense, pruned


def jax_worker() -> dict:
    import jax
    import jax.numpy as jnp

    from amap_jax import export_speed, models, xla_cpu
    from amap_jax.pruning import padding

    dtype = models.compute_dtype(_DTYPE.value)
    dense, pruned = _our_archs()
    b = common.BATCH.value
    x = jax.random.normal(
        jax.random.key(0), (b, sides.IMAGE.value, sides.IMAGE.value, 3), jnp.float32
    )

    kernels = {}

    def forward(name, arch, params):
        kernels[name] = common.kernel_set(arch, params, b, common.KERNELS.value)
        fwd = xla_cpu.jit(models.build(arch, dtype=dtype).apply, kernels[name])
        return lambda: jax.block_until_ready(fwd({"params": params}, x))

    def init(arch):
        return models.build(arch).init(jax.random.key(0), models.dummy_input(arch))["params"]

    fns = {"dense": forward("dense", dense, init(dense))}
    chosen = {}
    for name, arch in pruned.items():
        params = init(arch)
        fns[name] = forward(name, arch, params)
        multiple, report = export_speed.measured(
            arch, params, b, candidates=tuple(int(m) for m in _PAD.value)
        )
        chosen[name] = {"multiple": multiple, "gains": report["gains"]}
        if multiple != 1:
            fns[f"{name} padded"] = forward(f"{name} padded", *padding.pad(arch, params, multiple))
    speeds = interleaved(fns, common.SECONDS.value, common.ROUNDS.value, b)
    return {
        "images_per_s": speeds,
        "pad_multiple": chosen,
        "cpu_kernels": kernels,
        "jax": jax.__version__,
    }


# -- torch side ----------------------------------------------------------------------------


def _cut(torch, tp, model, head: int, hidden: int):
    """timm's ViT with every block at `head` channels per head and `hidden` MLP units, by
    Torch-Pruning's pruning functions (the first channels of each head kept)."""
    for blk in model.blocks:
        attn, mlp = blk.attn, blk.mlp
        h, d = attn.num_heads, attn.head_dim
        keep = [
            part * h * d + i * d + c for part in range(3) for i in range(h) for c in range(head)
        ]
        drop = sorted(set(range(3 * h * d)) - set(keep))
        tp.prune_linear_out_channels(attn.qkv, drop)
        drop_v = [i * d + c for i in range(h) for c in range(head, d)]
        tp.prune_linear_in_channels(attn.proj, drop_v)
        attn.head_dim = head
        if hasattr(attn, "attn_dim"):
            attn.attn_dim = h * head
        tp.prune_linear_out_channels(mlp.fc1, list(range(hidden, mlp.fc1.out_features)))
        tp.prune_linear_in_channels(mlp.fc2, list(range(hidden, mlp.fc2.in_features)))
    return model


def torch_worker() -> dict:
    import copy

    import torch_pruning as tp

    from bench import torch_env

    torch, timm = torch_env.load()
    dtype = torch.bfloat16 if _DTYPE.value == "bfloat16" else torch.float32
    b = common.BATCH.value
    dense = timm.create_model(
        sides.TIMM[sides.MODEL.value], pretrained=False, img_size=sides.IMAGE.value
    ).eval()
    x = torch.randn(b, 3, sides.IMAGE.value, sides.IMAGE.value)
    models = {"dense": dense}
    for head, hidden in _widths():
        models[f"{head}:{hidden}"] = _cut(torch, tp, copy.deepcopy(dense), head, hidden)

    def forward(m):
        def run():
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype, enabled=dtype != torch.float32),
            ):
                m(x)

        return run

    for name, m in models.items():  # the cut model computes: shapes are consistent
        with torch.inference_mode():
            assert m(x[:1]).shape == (1, 1000), name
    speeds = interleaved(
        {n: forward(m) for n, m in models.items()}, common.SECONDS.value, common.ROUNDS.value, b
    )
    return {
        "images_per_s": speeds,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_pruning": tp.__version__,
    }


# -- the parent: alternate, aggregate, report ------------------------------------------------


def summarize(runs: dict[str, list[dict]], ideal: dict[str, float]) -> list[dict]:
    """One row per width: img/s medians, speedups with their range over alternations."""
    rows = []

    def med(side, name):
        return float(np.median([v for r in runs[side] for v in r["images_per_s"].get(name, [])]))

    def ratios(run, name):  # dense and `name` ran in the same round: compare them there
        s = run["images_per_s"]
        return [p / d for p, d in zip(s[name], s["dense"], strict=True)]

    def speedup(side, name):
        return float(np.median([x for r in runs[side] for x in ratios(r, name)]))

    def per_alt(side, name):
        return [float(np.median(ratios(r, name))) for r in runs[side] if name in r["images_per_s"]]

    for name, ideal_speedup in ideal.items():
        row = {"widths": name, "ideal": round(ideal_speedup, 3)}
        for side, label in (("jax", "ours"), ("torch", "tp")):
            row[f"{label}_dense_img_s"] = round(med(side, "dense"), 2)
            row[f"{label}_pruned_img_s"] = round(med(side, name), 2)
            sp = speedup(side, name)
            lo, hi = min(per_alt(side, name)), max(per_alt(side, name))
            row[f"{label}_speedup"] = round(sp, 3)
            row[f"{label}_speedup_range"] = [round(lo, 3), round(hi, 3)]
            row[f"{label}_efficiency"] = round(sp / ideal_speedup, 3)
        padded = f"{name} padded"
        if any(padded in r["images_per_s"] for r in runs["jax"]):
            sp = speedup("jax", padded)
            row["ours_padded_img_s"] = round(med("jax", padded), 2)
            row["ours_padded_speedup"] = round(sp, 3)
            row["ours_padded_efficiency"] = round(sp / ideal_speedup, 3)
            chosen = runs["jax"][0]["pad_multiple"][name]  # a bare multiple in older results
            row["pad_multiple"] = chosen["multiple"] if isinstance(chosen, dict) else chosen
        row["ours_over_tp_dense"] = round(med("jax", "dense") / med("torch", "dense"), 3)
        best = max(row["ours_pruned_img_s"], row.get("ours_padded_img_s", 0))
        row["ours_over_tp_pruned"] = round(best / row["tp_pruned_img_s"], 3)
        rows.append(row)
    return rows


def pad_label(multiple) -> str:
    """`x8`; `attention x8, MLP x1` when every block has that pair; `per layer` otherwise."""
    if isinstance(multiple, int):
        return f"x{multiple}"
    pairs = {tuple(p) for p in multiple}
    if len(pairs) == 1:
        ((attn, mlp),) = pairs
        return f"attention x{attn}, MLP x{mlp}"
    return "per layer"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['model']} at {meta['image_size']} px, batch {meta['batch']}, {meta['dtype']}, "
        f"{meta['alternations']} alternations x {meta['rounds']} rounds "
        f"({meta['device']}, {meta['cpus']} CPUs)",
        "",
        "| widths (head:MLP) | ideal | ours img/s (dense / pruned / padded) | ours speedup "
        "(range) / ideal | padded / ideal | timm+TP img/s (dense / pruned) | TP speedup (range) "
        "/ ideal | ours / timm dense | ours / TP pruned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    kernels = meta.get("runs", {}).get("jax", [{}])[0].get("cpu_kernels")
    if kernels:  # what each of our models was compiled with (`amap_jax.xla_cpu`)
        lines.insert(1, "Our CPU kernel sets: " + ", ".join(f"{k} {v}" for k, v in kernels.items()))
    for r in rows:
        pad = (
            f"{r['ours_padded_img_s']:.1f} ({pad_label(r['pad_multiple'])})"
            if "ours_padded_img_s" in r
            else "- (unpadded fastest)"
        )
        pad_eff = f"{r['ours_padded_efficiency']:.2f}" if "ours_padded_efficiency" in r else "-"
        lines.append(
            f"| {r['widths']} | {r['ideal']:.2f}x | {r['ours_dense_img_s']:.1f} / "
            f"{r['ours_pruned_img_s']:.1f} / {pad} | {r['ours_speedup']:.2f}x "
            f"({r['ours_speedup_range'][0]:.2f}-{r['ours_speedup_range'][1]:.2f}) / "
            f"{r['ours_efficiency']:.2f} | {pad_eff} | {r['tp_dense_img_s']:.1f} / "
            f"{r['tp_pruned_img_s']:.1f} | {r['tp_speedup']:.2f}x "
            f"({r['tp_speedup_range'][0]:.2f}-{r['tp_speedup_range'][1]:.2f}) / "
            f"{r['tp_efficiency']:.2f} | {r['ours_over_tp_dense']:.2f}x "
            f"| {r['ours_over_tp_pruned']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = [1 / r["ideal"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = np.linspace(min(ratio) * 0.95, 1.0, 50)
    ax.plot(xs, 1 / xs, "k--", lw=1, label="ideal (dense MACs / pruned MACs)")
    ax.plot([1] + ratio, [1] + [r["ours_speedup"] for r in rows], "o-", label="ours (export)")
    if any("ours_padded_speedup" in r for r in rows):
        ax.plot(
            [1] + ratio,
            [1] + [r.get("ours_padded_speedup", r["ours_speedup"]) for r in rows],
            "s-",
            label="ours, padded as export_pad=0 (measured)",
        )
    ax.plot([1] + ratio, [1] + [r["tp_speedup"] for r in rows], "^-", label="timm + Torch-Pruning")
    for r, x in zip(rows, ratio, strict=True):
        for key in ("ours", "tp"):
            lo, hi = r[f"{key}_speedup_range"]
            ax.plot([x, x], [lo, hi], color="grey", lw=3, alpha=0.4)
    ax.set_xlabel("MACs ratio (pruned / dense)")
    ax.set_ylabel("speedup over the same framework's dense model")
    ax.set_title(title, fontsize=9)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(_):
    if sides.serve(jax_worker, torch_worker):
        return
    import jax

    from amap_jax.pruning.macs import model_macs

    dense, pruned = _our_archs()
    ideal = {name: model_macs(dense) / model_macs(a) for name, a in pruned.items()}
    name = f"vs_timm_{jax.default_backend()}{common.suffix()}"
    if _REBUILD.value:
        with open(os.path.join(common.out_dir(), f"{name}.json")) as f:
            meta = json.load(f)["meta"]
        return _report(name, summarize(meta["runs"], ideal), meta)
    runs = sides.alternate("bench.vs_timm")
    rows = summarize(runs, ideal)
    meta = {
        "model": f"ViT-{sides.MODEL.value}/16 (timm {sides.TIMM[sides.MODEL.value]})",
        "image_size": sides.IMAGE.value,
        "batch": common.BATCH.value,
        "dtype": _DTYPE.value,
        "rounds": common.ROUNDS.value,
        "alternations": sides.ALTERNATIONS.value,
        "seconds": common.SECONDS.value,
        "device": str(jax.devices()[0].device_kind),
        "cpus": common.cpus(),
        "versions": {
            k: v
            for r in runs.values()
            for k, v in r[0].items()
            if k not in ("images_per_s", "pad_multiple", "cpu_kernels")
        },
        "runs": runs,
    }
    _report(name, rows, meta)


def _report(name: str, rows: list[dict], meta: dict) -> None:
    meta = {k: v for k, v in meta.items() if k not in ("backend", "machine", "jax")}
    md = markdown(rows, meta)
    path = common.write(name, rows, meta, md)
    png = os.path.join(common.out_dir(), f"{name}.png")
    plot(rows, png, f"{meta['model']}, batch {meta['batch']}, {meta['dtype']}, {meta['device']}")
    print(md)
    print(f"wrote {path}, {os.path.basename(png)}")


if __name__ == "__main__":
    common.run(main)
