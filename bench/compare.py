"""Which method to pick: every method from the same dense checkpoint, same epochs, several seeds.

  python -m bench.compare [--root workdirs/compare] [--configs vit,flatten,tokens]
      [--targets 0.7,0.5] [--methods amap,vtp,...] [--seeds 0,1] [--ablations]
    [--set train.epochs=2,search.epochs=0.25,...]

Each cell (config, method or AMAP ablation, MACs target, seed) is a whole run (search -> export
-> fine-tune -> eval) in its own work directory under ROOT, started from a copy of the config's
one dense checkpoint, so every method starts from the same weights and gets the same search and
fine-tune epochs. A finished cell is read back, not rerun: the grid can be completed over
several sittings. Per config and seed there is also "dense, equal budget": the dense model
trained for the same extra epochs (search + fine-tune) with the fine-tuning recipe, so that a
pruned model is compared with a dense model of equal training budget.

Channel methods (amap, vtp, magnitude, random) run on the `vit` and `flatten` configs; the
`tokens` config (100 tokens per image, not in the default grid: a cell takes about 20 minutes on
2 cores) compares amap, asvit and amap+asvit, with kept tokens per pruning point and images/s of
the exported model at batch 1 and at the bench batch (`eval.bench_batch`, 64).

`--set` changes the schedule (or any setting) of every run of the grid alike, dense stage
included, and is written into the report: a shorter schedule is a fair comparison between
methods, not a substitute for the config's own.

Writes bench/results/compare.json, compare.md, compare_top1_vs_macs.png, compare_widths.png.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import time

import jax
import numpy as np
from absl import app, flags, logging

from amap_jax import logs, pipeline
from amap_jax import workdir as workdir_lib
from amap_jax.io import pruned as pruned_io
from amap_jax.pruning import macs
from amap_jax.train import checkpoint
from bench import common

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "vit": "configs/fmnist_amap_vit.py",
    "flatten": "configs/fmnist_amap_flatten.py",
    "tokens": "configs/fmnist_tokens.py",
}
METHODS = {
    "vit": ("amap", "vtp", "magnitude", "random"),
    "flatten": ("amap", "vtp", "magnitude", "random"),
    "tokens": ("amap", "asvit", "amap+asvit"),
}
TOKEN_METHODS = ("asvit", "amap+asvit")
# AMAP with one component off (on the FLatten config at the first target).
ABLATIONS = {
    "amap: no similarity": {"amap.similarity": False},
    "amap: no reweight": {"amap.reweight": False},
    "amap: no head balancing": {"amap.head_balanced": False},
    "amap: init=constant": {"amap.init": "constant"},
}
# AMAP+AS-ViT with its other schedule (on the tokens config at the last target).
TOKEN_VARIANTS = {"amap+asvit: channels_first": {"compose.schedule": "channels_first"}}
DENSE_BUDGET = "dense, equal budget"

_ROOT = flags.DEFINE_string("root", "workdirs/compare", "Where the cells' work directories go.")
_CONFIGS = flags.DEFINE_list("configs", ["vit", "flatten"], f"Configs ({', '.join(CONFIGS)}).")
_METHODS = flags.DEFINE_list("methods", None, "Methods (default: every method of each config).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (search / fine-tune / random choice).")
_ABLATIONS = flags.DEFINE_bool("ablations", True, "AMAP ablations on flatten at the first target.")
_SET = flags.DEFINE_list(
    "set", [], "KEY=VALUE settings applied to every run of the grid (e.g. train.epochs=2)."
)
_SPEED = flags.DEFINE_bool(
    "speed",
    False,
    "Measure every finished channel cell's exported model again in this one sitting, each "
    "beside the dense model (alternated), and report that speedup: the one measured while the "
    "cell ran shares the machine with whatever else ran then.",
)
CELLS = flags.DEFINE_list(
    "cells",
    ["vit/amap_t0.7_s0", "vit/amap_t0.5_s0", "flatten/amap_t0.7_s0", "flatten/amap_t0.5_s0"],
    "Benches that measure finished cells' exports: which ones (CONFIG/CELL under --root).",
)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Only rebuild the report from finished cells."
)


def load_config(name: str):
    path = os.path.join(ROOT_DIR, CONFIGS[name])
    spec = importlib.util.spec_from_file_location(f"compare_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _override(module.get_config(), settings())


def settings() -> dict:
    """--set as a dict, each value parsed as the type the config already holds there."""
    out = {}
    for item in _SET.value:
        key, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _override(config, overrides: dict):
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        node = config[section] if section else config
        if leaf not in node:
            raise app.UsageError(f"{key}: no such setting in the config")
        if isinstance(value, str) and not isinstance(node[leaf], str):
            value = type(node[leaf])(_literal(value))
        node[leaf] = value
    return config


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _cell_name(variant: str, target: float, seed: int) -> str:
    slug = variant.replace(": ", "_").replace(" ", "_").replace("=", "-").replace(",", "")
    return f"{slug}_t{target}_s{seed}"


def dense_stage(name: str, root: str) -> dict:
    """The config's one dense model: trained once, evaluated, its checkpoint shared by cells."""
    workdir = os.path.join(root, name, "dense")
    record = os.path.join(workdir, "dense.json")
    if os.path.exists(record):
        return checkpoint.read_json(record)
    config = load_config(name)
    t0 = time.time()
    ctx, arch = pipeline.make_context(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    params = pipeline.train_dense(ctx, arch)
    top1 = ctx.evaluate(ctx.build(arch), {"params": params})["top1"]
    out = {"top1": round(top1, 2), "macs": int(macs.model_macs(arch)), "wall_s": time.time() - t0}
    checkpoint.write_json(record, out)
    return out


def finished_exports():
    """(cell, config name, export dir) of every finished `CONFIG/CELL` of --cells under --root
    (the others are reported and skipped)."""
    for cell in CELLS.value:
        name, _, run = cell.partition("/")
        export = os.path.join(_ROOT.value, name, run, "export")
        if not pruned_io.is_finished(export):
            print(f"skipped {cell}: no finished export in {export}")
            continue
        yield cell, name, export


def _seed_dense(root: str, name: str, workdir: str, config) -> None:
    """A cell starts from a copy of the shared dense checkpoint (trained with seed 0), recorded
    as the cell's own finished `dense` stage whatever the cell's seed."""
    if not os.path.exists(os.path.join(workdir, "dense")):
        os.makedirs(workdir, exist_ok=True)
        shutil.copytree(os.path.join(root, name, "dense", "dense"), os.path.join(workdir, "dense"))
        workdir_lib.record(workdir, config, "dense")


def run_cell(root: str, name: str, variant: str, target: float, seed: int) -> dict:
    workdir = os.path.join(root, name, _cell_name(variant, target, seed))
    record = os.path.join(workdir, "cell.json")
    if os.path.exists(record):
        return checkpoint.read_json(record)
    config = load_config(name)
    config.seed = seed
    config.search.target = target
    _seed_dense(root, name, workdir, config)
    t0 = time.time()
    if variant == DENSE_BUDGET:
        result = _dense_budget(config, workdir)
    else:
        if variant in ABLATIONS:
            method, overrides = "amap", ABLATIONS[variant]
        elif variant in TOKEN_VARIANTS:
            method, overrides = variant.partition(":")[0], TOKEN_VARIANTS[variant]
        else:
            method, overrides = variant, {}
        config.method = method
        _override(config, overrides)
        s = pipeline.run(config, workdir)
        result = {
            "top1": s["pruned"]["top1"],
            "before_finetune_top1": s["pruned_before_finetune_top1"],
            "dense_top1": s["dense"]["top1"],
            "macs_ratio": s["macs_ratio"],
            "speedup": s["speedup"],
            "ideal_speedup": s["ideal_speedup"],
            "export_max_logit_diff": s["export_max_logit_diff"],
            "pruned_blocks": s["arch"]["pruned_blocks"],
        }
        if "speedup_batch1" in s:
            result.update(
                kept_tokens_mean=s["pruned"]["kept_tokens_mean"],
                kept_tokens_of=s["pruned"]["kept_tokens_of"],
                speedup_batch1=s["speedup_batch1"],
                images_per_s=s["pruned"]["images_per_s"],
                images_per_s_batch1=s["pruned"]["images_per_s_batch1"],
            )
    result.update(config=name, variant=variant, target=target, seed=seed)
    result["wall_s"] = round(time.time() - t0, 1)
    checkpoint.write_json(record, result)
    return result


def _dense_budget(config, workdir: str) -> dict:
    """The dense model trained for search + fine-tune epochs more, with the fine-tuning recipe
    (distillation from the same dense teacher included)."""
    config.finetune.epochs = config.search.epochs + config.finetune.epochs
    ctx, arch = pipeline.make_context(config, workdir)
    dense = pipeline.train_dense(ctx, arch)
    params = pipeline.finetune(ctx, arch, dense, arch, dense)
    top1 = ctx.evaluate(ctx.build(arch), {"params": params})["top1"]
    return {"top1": round(top1, 2), "macs_ratio": 1.0, "speedup": 1.0, "ideal_speedup": 1.0}


def grid() -> list[tuple[str, str, float, int]]:
    targets = [float(t) for t in common.TARGETS.value]
    seeds = [int(s) for s in _SEEDS.value]
    cells = []
    for name in _CONFIGS.value:
        cells += [(name, DENSE_BUDGET, 1.0, s) for s in seeds]
        methods = [m for m in (_METHODS.value or METHODS[name]) if m in METHODS[name]]
        cells += [(name, m, t, s) for t in targets for m in methods for s in seeds]
        if _ABLATIONS.value and name == "flatten":
            cells += [(name, v, targets[0], s) for v in ABLATIONS for s in seeds]
        if _ABLATIONS.value and name == "tokens":
            cells += [(name, v, targets[-1], s) for v in TOKEN_VARIANTS for s in seeds]
    return cells


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (config, variant, target): mean and standard deviation over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["config"], r["variant"], r["target"]), []).append(r)
    rows = []
    for (name, variant, target), rs in groups.items():
        top1 = np.array([r["top1"] for r in rs])
        row = {
            "config": name,
            "variant": variant,
            "target": target,
            "seeds": len(rs),
            "top1_mean": round(float(top1.mean()), 2),
            "top1_sd": round(float(top1.std(ddof=1)) if len(rs) > 1 else 0.0, 2),
            "top1_all": [float(t) for t in top1],
            "macs_ratio": round(float(np.mean([r["macs_ratio"] for r in rs])), 4),
            "speedup": round(float(np.mean([r.get("quiet_speedup", r["speedup"]) for r in rs])), 3),
            "ideal_speedup": round(float(np.mean([r["ideal_speedup"] for r in rs])), 3),
            "wall_s": round(float(np.mean([r["wall_s"] for r in rs])), 1),
        }
        if "before_finetune_top1" in rs[0]:
            b = np.array([r["before_finetune_top1"] for r in rs])
            row["before_finetune_mean"] = round(float(b.mean()), 2)
            row["before_finetune_sd"] = round(float(b.std(ddof=1)) if len(rs) > 1 else 0.0, 2)
            row["max_logit_diff"] = max(r["export_max_logit_diff"] for r in rs)
        if "kept_tokens_mean" in rs[0]:
            row["kept_tokens_mean"] = [
                round(float(x), 1) for x in np.mean([r["kept_tokens_mean"] for r in rs], 0)
            ]
            row["kept_tokens_of"] = rs[0]["kept_tokens_of"]
            row["speedup_batch1"] = round(float(np.mean([r["speedup_batch1"] for r in rs])), 3)
        rows.append(row)
    return rows


def _find(rows, name, variant, target=None):
    for r in rows:
        if r["config"] == name and r["variant"] == variant and target in (None, r["target"]):
            return r
    return None


def verdicts(rows: list[dict], dense: dict) -> list[str]:
    """The issue's targets with the measured result beside each."""
    out = []
    for name in sorted({r["config"] for r in rows}):
        budget = _find(rows, name, DENSE_BUDGET)
        for target, allowed in ((0.7, 0.3), (0.5, 1.0)):
            a = _find(rows, name, "amap", target)
            if a and budget:
                gap = round(budget["top1_mean"] - a["top1_mean"], 2)  # means are rounded to 0.01
                ok = "met" if gap <= allowed else "not met"
                out.append(
                    f"{name}, {target}: AMAP {a['top1_mean']:.2f} vs equal-budget dense "
                    f"{budget['top1_mean']:.2f}: {gap:+.2f} points below "
                    f"(target <= {allowed}): {ok}"
                )
            order = [
                m for m in ("amap", "vtp", "magnitude", "random") if _find(rows, name, m, target)
            ]
            if len(order) > 1:
                found = {m: _find(rows, name, m, target) for m in order}
                got = sorted(order, key=lambda m: -found[m]["top1_mean"])
                means = [found[m]["top1_mean"] for m in order]
                strict = all(a > b for a, b in zip(means, means[1:], strict=False))
                ok = "met" if got == order and strict else "not met"
                scores = ", ".join(f"{m} {found[m]['top1_mean']:.2f}" for m in got)
                sd = max(found[m]["top1_sd"] for m in order)
                spread = max(means) - min(means)
                noise = f"; all within {spread:.2f} points, seed sd up to {sd:.2f}" * (
                    spread <= 2 * sd
                )
                out.append(f"{name}, {target}: order {' > '.join(got)} ({scores}{noise}): {ok}")
            out += _token_verdicts(rows, name, target, budget)
    return out


def _token_verdicts(rows, name, target, budget) -> list[str]:
    out = []
    t = _find(rows, name, "asvit", target)
    if t and budget:
        drop = round(budget["top1_mean"] - t["top1_mean"], 2)
        ok = "met" if t["speedup"] >= 1.5 and drop <= 0.5 else "not met"
        out.append(
            f"{name}, {target}: AS-ViT {t['speedup']:.2f}x images/s at the bench batch "
            f"({t['speedup_batch1']:.2f}x at batch 1) for {drop:+.2f} points below equal-budget "
            f"dense (target >= 1.5x at <= 0.5): {ok}"
        )
    both = _find(rows, name, "amap+asvit", target)
    alone = [r for r in (_find(rows, name, "amap", target), t) if r]
    if target == 0.5 and both and len(alone) == 2:
        ok = "met" if all(both["top1_mean"] > r["top1_mean"] for r in alone) else "not met"
        out.append(
            f"{name}, {target}: AMAP+AS-ViT {both['top1_mean']:.2f} vs AMAP "
            f"{alone[0]['top1_mean']:.2f} and AS-ViT {alone[1]['top1_mean']:.2f} "
            f"(target: above both): {ok}"
        )
    return out


def markdown(rows: list[dict], dense: dict, notes: list[str]) -> str:
    lines = [
        "| config | MACs target | method | top-1 (mean ± sd) | before fine-tune | MACs ratio "
        "| speedup (ideal) | seeds | wall per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    token_rows = [r for r in rows if r["config"] == "tokens"]
    for name in sorted({r["config"] for r in rows} - {"tokens"}):
        lines.append(
            f"| {name} | - | dense, {dense[name]['top1']:.2f} after training | | | 1.000 | | 1 | |"
        )
        for r in sorted(
            (r for r in rows if r["config"] == name),
            key=lambda r: (-r["target"], r["variant"] != "amap", r["variant"]),
        ):
            before = (
                f"{r['before_finetune_mean']:.2f} ± {r['before_finetune_sd']:.2f}"
                if "before_finetune_mean" in r
                else ""
            )
            target = "-" if r["variant"] == DENSE_BUDGET else r["target"]
            lines.append(
                f"| {name} | {target} | {r['variant']} | {r['top1_mean']:.2f} ± {r['top1_sd']:.2f} "
                f"| {before} | {r['macs_ratio']:.3f} "
                f"| {r['speedup']:.2f}x ({r['ideal_speedup']:.2f}x) "
                f"| {r['seeds']} | {r['wall_s'] / 60:.1f} min |"
            )
    if token_rows:
        lines = lines[:-2] if len(lines) == 2 else lines + [""]  # no channel rows: no table
        lines += [_token_table(token_rows, dense.get("tokens"))]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def _token_table(rows: list[dict], dense: dict | None) -> str:
    lines = [
        "| MACs target | method | top-1 (mean ± sd) | before fine-tune | MACs ratio "
        "| kept tokens per point | speedup batch 64 (ideal) | speedup batch 1 | seeds "
        "| wall per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if dense:
        lines.append(f"| - | dense, {dense['top1']:.2f} after training | | | 1.000 | | | | 1 | |")
    for r in sorted(rows, key=lambda r: (-r["target"], r["variant"])):
        kept = (
            " / ".join(f"{k:.0f}" for k in r["kept_tokens_mean"]) + f" of {r['kept_tokens_of']}"
            if "kept_tokens_mean" in r
            else "all"
        )
        before = (
            f"{r['before_finetune_mean']:.2f} ± {r['before_finetune_sd']:.2f}"
            if "before_finetune_mean" in r
            else ""
        )
        b1 = f"{r['speedup_batch1']:.2f}x" if "speedup_batch1" in r else ""
        lines.append(
            f"| {'-' if r['variant'] == DENSE_BUDGET else r['target']} | {r['variant']} "
            f"| {r['top1_mean']:.2f} ± {r['top1_sd']:.2f} | {before} | {r['macs_ratio']:.3f} "
            f"| {kept} | {r['speedup']:.2f}x ({r['ideal_speedup']:.2f}x) | {b1} | {r['seeds']} "
            f"| {r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def plots(rows: list[dict], results: list[dict], dense: dict, suffix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["config"] for r in rows})
    paths = []
    if not names:  # nothing finished yet
        return paths
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 5.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for variant in METHODS[name]:
            pts = sorted(
                (r for r in rows if r["config"] == name and r["variant"] == variant),
                key=lambda r: r["macs_ratio"],
            )
            if pts:
                ax.errorbar(
                    [r["macs_ratio"] for r in pts],
                    [r["top1_mean"] for r in pts],
                    yerr=[r["top1_sd"] for r in pts],
                    marker="o",
                    capsize=3,
                    label=variant,
                )
        budget = _find(rows, name, DENSE_BUDGET)
        if budget:
            ax.axhline(budget["top1_mean"], color="k", lw=1, label=DENSE_BUDGET)
            lo, hi = (
                budget["top1_mean"] - budget["top1_sd"],
                budget["top1_mean"] + budget["top1_sd"],
            )
            ax.axhspan(lo, hi, color="k", alpha=0.08)
        ax.axhline(dense[name]["top1"], color="k", lw=1, ls=":", label="dense (before pruning)")
        ax.set_title(f"Fashion-MNIST, {name}")
        ax.set_xlabel("MACs ratio (pruned / dense)")
        ax.set_ylabel("top-1 % (mean ± sd over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    paths.append(os.path.join(common.RESULTS, f"compare_top1_vs_macs{suffix}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    names = [n for n in names if n != "tokens"]  # widths of the channel methods
    if not names:
        return paths
    sites = ("attn_in", "qk", "v", "mlp_in", "hidden")
    fig, axes = plt.subplots(len(names), len(sites), figsize=(16, 3.2 * len(names)), squeeze=False)
    for row_axes, name in zip(axes, names, strict=True):
        arch = pipeline_arch(name)
        full = {
            "attn_in": [arch.embed_dim] * len(arch.blocks),
            "qk": [b.qk_dim for b in arch.blocks],
            "v": [b.v_dim for b in arch.blocks],
            "mlp_in": [arch.embed_dim] * len(arch.blocks),
            "hidden": [b.mlp_dim for b in arch.blocks],
        }
        col = {"qk": 2, "v": 3, "hidden": 4, "attn_in": 5, "mlp_in": 6}
        variants = list(METHODS[name])
        width = 0.8 / len(variants)
        for ax, site in zip(row_axes, sites, strict=True):
            for k, variant in enumerate(variants):
                cell = [
                    r
                    for r in results
                    if r["config"] == name and r["variant"] == variant and r["target"] == 0.5
                ]
                if not cell:
                    continue
                kept = [
                    b[col[site]] / f
                    for b, f in zip(cell[0]["pruned_blocks"], full[site], strict=True)
                ]
                x = np.arange(len(kept)) + (k - (len(variants) - 1) / 2) * width
                ax.bar(x, kept, width, label=variant)
            ax.set_title(f"{name}: {site}")
            ax.set_xlabel("block")
            ax.set_ylim(0, 1.05)
            ax.set_xticks(range(len(arch.blocks)))
        row_axes[0].set_ylabel("kept share (per head), MACs 0.5")
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes[:, 0]), key=len)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    paths.append(os.path.join(common.RESULTS, f"compare_widths{suffix}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def pipeline_arch(name: str):
    """The dense architecture of a config (the data's shape: Fashion-MNIST 28x28x1, 10 classes)."""
    from amap_jax.models.arch import vit_arch

    c = load_config(name)
    return vit_arch(
        c.model.variant,
        pattern=c.model.pattern,
        num_classes=10,
        in_chans=1,
        image_size=c.data.image_size or 28,
        patch_size=c.model.patch_size or None,
    )


def measure_speeds(root: str, results: list[dict], seconds: float = 2.0) -> None:
    """`quiet_speedup` of every channel cell: its export's images/s over the dense model's,
    measured back to back (dense, export, dense, ...) so both see the same machine; cached in
    the cell's speed.json."""
    from amap_jax import models
    from amap_jax.io import pruned
    from amap_jax.train.evaluate import throughput

    dense = {}
    for r in results:
        if r["config"] == "tokens" or r["variant"] == DENSE_BUDGET:
            continue
        path = os.path.join(root, r["config"], _cell_name(r["variant"], r["target"], r["seed"]))
        record = os.path.join(path, "speed.json")
        if os.path.exists(record):
            r.update(checkpoint.read_json(record))
            continue
        batch = load_config(r["config"]).eval.bench_batch
        if r["config"] not in dense:
            arch = pipeline_arch(r["config"])
            model = models.build(arch)
            params = model.init(jax.random.key(0), models.dummy_input(arch))
            dense[r["config"]] = (model, params, arch)
        d_model, d_vars, d_arch = dense[r["config"]]
        model, variables = pruned.load_pruned(os.path.join(path, "export"))
        d1 = throughput(d_model, d_vars, d_arch, batch, seconds=seconds)
        p = throughput(model, variables, model.arch, batch, seconds=seconds)
        d2 = throughput(d_model, d_vars, d_arch, batch, seconds=seconds)
        out = {
            "quiet_speedup": round(p / ((d1 + d2) / 2), 3),
            "quiet_dense_spread": round(abs(d1 - d2) / max(d1, d2), 3),
        }
        checkpoint.write_json(record, out)
        r.update(out)
        print(
            f"{r['config']} {r['variant']} {r['target']} s{r['seed']}: "
            f"{out['quiet_speedup']:.2f}x (ideal {r['ideal_speedup']:.2f}x)",
            flush=True,
        )


def main(_):
    logging.set_verbosity(logging.WARNING)  # as train.py: library INFO chatter off
    logs.setup()
    root = os.path.abspath(_ROOT.value)
    cells = grid()
    results, dense = [], {}
    t_start = time.time()
    for name in _CONFIGS.value:
        if not _REPORT_ONLY.value or os.path.exists(
            os.path.join(root, name, "dense", "dense.json")
        ):
            dense[name] = dense_stage(name, root)
            print(f"dense {name}: top-1 {dense[name]['top1']:.2f}", flush=True)
    for k, (name, variant, target, seed) in enumerate(cells, 1):
        record = os.path.join(root, name, _cell_name(variant, target, seed), "cell.json")
        cached = os.path.exists(record)
        if _REPORT_ONLY.value and not cached:
            continue
        r = run_cell(root, name, variant, target, seed)
        results.append(r)
        done = time.time() - t_start
        how = "cached" if cached else f"{r['wall_s']:.0f} s"
        print(
            f"[{k}/{len(cells)}] {name} {variant} target {target} seed {seed}: "
            f"top-1 {r['top1']:.2f}, MACs {r['macs_ratio']:.3f} ({how}; "
            f"{done / 60:.0f} min this sitting)",
            flush=True,
        )
    if _SPEED.value:
        measure_speeds(root, results)
    rows = aggregate(results)
    notes = verdicts(rows, dense)
    if _SET.value:
        notes.insert(0, f"every run with {', '.join(_SET.value)}")
    suffix = common.suffix()
    md = markdown(rows, dense, notes)
    path = common.write(
        f"compare{suffix}",
        rows,
        {"dense": dense, "cells": results, "verdicts": notes, "root": root, "set": settings()},
        md,
    )
    pngs = plots(rows, results, dense, suffix)
    print(md)
    print(f"wrote {path}, compare{suffix}.md, " + ", ".join(os.path.basename(p) for p in pngs))


if __name__ == "__main__":
    app.run(main)
