"""What a run reports: dense and pruned side by side (top-1, MACs, speed timed interleaved),
the budget as asked and as achieved, and the table it prints.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from amap_jax.io import pruned
from amap_jax.logs import log as logging
from amap_jax.models import tokens
from amap_jax.models.arch import Arch
from amap_jax.pipeline import stages, tuning
from amap_jax.pipeline.context import Context, count_params
from amap_jax.pruning import macs
from amap_jax.train import evaluate as evaluate_lib
from amap_jax.train.evaluate import throughput

SPEED_ROUNDS = 5

# Same-round speedups that spread over more than this share of their median: the machine was
# busy while they were timed, and the summary says so.
BUSY_SPREAD = 0.2


def paired_speeds(
    ctx: Context,
    arch: Arch,
    params,
    p_arch: Arch,
    p_params,
    p_kernels: str,
    batch: int | None = None,
):
    """Dense and pruned images/s per round, timed interleaved at `batch` (default the bench
    batch; `evaluate.paired_throughput`), and the dense model's kernel set."""
    kernels = tuning.kernels(ctx, arch, params)
    bench = ctx.config.eval
    runs = {
        "dense": (ctx.build(arch), {"params": params}, arch, kernels),
        "pruned": (ctx.build(p_arch), {"params": p_params}, p_arch, p_kernels),
    }
    speeds = evaluate_lib.paired_throughput(
        runs, batch or bench.bench_batch, seconds=bench.bench_seconds, rounds=SPEED_ROUNDS
    )
    return speeds, kernels


def _rounds(ratios: list[float]) -> tuple[float, float, float, bool]:
    """Median, lowest and highest of same-round ratios, and whether they spread so far that
    the machine was busy."""
    median, low, high = float(np.median(ratios)), min(ratios), max(ratios)
    return median, low, high, bool((high - low) > BUSY_SPREAD * median)


def speedup_of(speeds: dict[str, list[float]]) -> dict:
    """The pruned/dense ratio of every round: its median, its range, and whether the rounds
    spread so far that the machine was busy."""
    ratios = [p / d for p, d in zip(speeds["pruned"], speeds["dense"], strict=True)]
    median, low, high, busy = _rounds(ratios)
    return {
        "speedup": round(median, 3),
        "speedup_range": [round(low, 3), round(high, 3)],
        "speed_rounds": len(ratios),
        "speed_busy": busy,
    }


def measured_latency(ctx: Context, arch: Arch, params, p_arch: Arch, p_params, p_kernels):
    """Pruned / dense seconds per batch of `search.latency_batch`, timed interleaved: the
    median over rounds, the range, whether the machine was busy."""
    batch = ctx.config.search.latency_batch
    speeds, _ = paired_speeds(ctx, arch, params, p_arch, p_params, p_kernels, batch)
    ratios = [d / p for p, d in zip(speeds["pruned"], speeds["dense"], strict=True)]
    median, low, high, busy = _rounds(ratios)
    return {
        "batch": batch,
        "measured": round(median, 4),
        "measured_range": [round(low, 4), round(high, 4)],
        "busy": busy,
    }


def report(
    ctx: Context,
    arch: Arch,
    params,
    top1: float,
    unpadded: Arch | None = None,
    kernels: str | None = None,
    images_per_s: float | None = None,
) -> dict:
    """`macs` are the pruned model's; `padded_macs` what its padded export computes; speed
    `images_per_s` (None: timed here alone) with CPU kernel set `kernels` (None: as
    `cpu_kernels` says)."""
    model = ctx.build(arch)
    bench = ctx.config.eval
    if arch.token_points:
        return token_report(ctx, model, {"params": params}, top1, unpadded or arch)
    padded = {} if unpadded in (None, arch) else {"padded_macs": int(macs.model_macs(arch))}
    kernels = kernels or tuning.kernels(ctx, arch, params)
    return {
        **padded,
        "params": count_params(params),
        "macs": int(macs.model_macs(unpadded or arch)),
        "top1": round(top1, 2),
        "images_per_s": round(
            images_per_s
            or throughput(
                model,
                {"params": params},
                arch,
                bench.bench_batch,
                seconds=bench.bench_seconds,
                kernels=kernels,
            ),
            1,
        ),
        "cpu_kernels": kernels,
    }


def token_report(ctx: Context, model, variables, top1: float, count_arch: Arch) -> dict:
    """A model that drops tokens: MACs are the mean over the test images, speed is measured on
    test images (what is kept depends on the image) at the bench batch, with the dropping
    forward of the export (one compiled program over its `token_buckets`, as forward.jax runs
    it); batch 1 is timed beside the dense model (`evaluate.batch1_speeds`)."""
    arch, bench = model.arch, ctx.config.eval
    batches = ctx.test.eval_batches(bench.batch_size, ctx.process_index, ctx.process_count)
    kept = evaluate_lib.kept_tokens(model, variables, batches, ctx.inputs, ctx.mesh)
    counts = macs.token_counts(
        arch, arch.token_points, [kept[:, k] + arch.num_prefix for k in range(kept.shape[1])]
    )
    images = tuning.bench_images(ctx)
    speed = evaluate_lib.token_throughput(
        model, variables, images, bench.bench_batch, seconds=bench.bench_seconds
    )
    return {
        "params": count_params(variables["params"]),
        "macs": int(np.mean(macs.model_macs(count_arch, None, counts))),
        "top1": round(top1, 2),
        "images_per_s": round(speed, 1),
        "kept_tokens_mean": [round(float(x), 2) for x in kept.mean(0)],
        "kept_tokens_of": arch.grid**2,
        "token_groups": tokens.groups_of(arch),
    }


def budget(search_cfg, achieved_macs: float, dense_macs: float, timed: dict | None = None) -> dict:
    """The budget as achieved by the export (padding included; for tokens the mean over the
    test set) against the one asked for: its MACs ratio, or for a latency target the ratio
    timed against the dense model (`timed`, `measured_latency`; `predicted`: the latency
    model's)."""
    if search_cfg.budget_kind == "latency":
        achieved, tol = timed["measured"], search_cfg.latency_tolerance
    else:
        achieved, tol = achieved_macs / dense_macs, search_cfg.target_tolerance
    return {
        "kind": search_cfg.budget_kind,
        "target": search_cfg.target,
        "achieved": round(achieved, 4),
        "tolerance": tol,
        "met": bool(abs(achieved - search_cfg.target) <= tol),
        **(timed or {}),
    }


def budget_message(s: dict) -> str:
    b = s["budget"]
    kind, key = (
        ("latency", "latency_tolerance")
        if b.get("kind") == "latency"
        else ("MACs", "target_tolerance")
    )
    return (
        f"the export's {kind} ratio {b['achieved']:.3f} misses its target {b['target']} by more "
        f"than search.{key}={b['tolerance']}; the export is kept in {s['export_dir']}"
    )


def format_summary(s: dict) -> str:
    rows = [("", "params", "MACs", "top-1 %", "images/s")]
    for k in ("dense", "pruned"):
        r = s[k]
        rows.append(
            (
                k,
                f"{r['params']:,}",
                f"{r['macs'] / 1e6:.2f}M",
                f"{r['top1']:.2f}",
                f"{r['images_per_s']:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    speed = f"speedup {s['speedup']:.2f}x"
    if "speedup_range" in s:
        low, high = s["speedup_range"]
        speed += f" ({low:.2f}-{high:.2f} over {s['speed_rounds']} interleaved rounds)"
    lines.append(
        f"MACs ratio {s['macs_ratio']:.3f} (target {s['target_macs_ratio']}), "
        f"top-1 change {s['pruned']['top1'] - s['dense']['top1']:+.2f}, "
        f"{speed} (ideal {s['ideal_speedup']:.2f}x), method {s['method']}"
    )
    b = s.get("budget", {})
    if b.get("kind") == "latency":
        low, high = b["measured_range"]
        lines.append(
            f"latency ratio at batch {b['batch']}: {b['measured']:.3f} timed "
            f"({low:.3f}-{high:.3f}), {b['predicted']:.3f} predicted (target {b['target']})"
        )
    if s.get("speed_busy"):
        lines.append(
            "the machine was busy while the speeds were timed (the rounds spread widely): "
            "read the speedup as rough, or time it on a quiet machine"
        )
    pad = s.get("export_pad", 1)
    if pad != 1 and "padded_macs" in s["pruned"]:
        how = (
            f"to multiples of {pad}"
            if isinstance(pad, int)
            else "per block (attention, MLP): " + " ".join(f"{a}/{m}" for a, m in pad)
        )
        lines.append(f"export padded {how}: {s['pruned']['padded_macs'] / 1e6:.2f}M MACs computed")
    kernels = [s[k].get("cpu_kernels", "default") for k in ("dense", "pruned")]
    if kernels != ["default", "default"]:
        lines.append(f"CPU kernels: dense {kernels[0]}, pruned {kernels[1]}")
    if s.get("reference"):
        lines.append(f"published: {s['reference']}")
    return "\n".join(lines)


@dataclasses.dataclass
class Trace:
    """What the stages leave for the summary."""

    dense_params: object
    dense_top1: float
    search_ends: dict  # search_end, fixup[, report]
    searched: dict  # stages.evaluate_search
    unpadded: Arch  # the export before padding
    untrained: bool
    export_dir: str


def summarize(ctx: Context, arch: Arch, method, t: Trace, model, loaded, multiple) -> dict:
    """summary.json: dense and exported (`model`, `loaded`; padded to `multiple`) side by side
    on the test split, the validation split's numbers apart, speeds timed interleaved, and the
    budget as asked and as achieved."""
    config, workdir = ctx.config, ctx.workdir
    dense_params, unpadded, p_arch = t.dense_params, t.unpadded, model.arch
    pruned_top1 = ctx.evaluate(model, loaded)["top1"]
    p_kernels = pruned.kernels(t.export_dir)
    speeds, d_kernels = None, None  # a token export times its own way
    if not p_arch.token_points:
        speeds, d_kernels = paired_speeds(
            ctx, arch, dense_params, p_arch, loaded["params"], p_kernels
        )
    s = {
        "method": config.method,
        "method_settings": {k: config[k].to_dict() for k in method.sections()},
        "target_macs_ratio": config.search.target,
        "dense": report(
            ctx,
            arch,
            dense_params,
            t.dense_top1,
            kernels=d_kernels,
            images_per_s=speeds and float(np.median(speeds["dense"])),
        ),
        "pruned": report(
            ctx,
            p_arch,
            loaded["params"],
            pruned_top1,
            unpadded,
            p_kernels,
            images_per_s=speeds and float(np.median(speeds["pruned"])),
        ),
        "pruned_before_finetune_top1": round(t.searched["exported_top1"], 2),
        "finetune_top1_by_epoch": stages.finetune_curve(workdir),
        "masked_top1": round(t.searched["masked_top1"], 2),
        "export_max_logit_diff": t.searched["export_diff"],
        "arch": {
            "dense": arch.name,
            # per block: attention kind, heads, q/k and v per head, MLP, q/k/v and fc1 inputs
            "pruned_blocks": [
                [b.attn, b.heads, b.qk_dim, b.v_dim, b.mlp_dim, *macs.widths(b, g.dim)[3:]]
                for b, g in zip(unpadded.blocks, unpadded.geometry(), strict=True)
            ],
        },
        "export_dir": t.export_dir,
        "export_pad": multiple,
        "reference": config.reference,
        # Every "top1" above is the test split's; "val" holds the validation split's.
        "splits": {
            "train": config.data.train_split,
            "val": config.data.val_split or None,
            "test": config.data.test_split,
        },
        **({"dense_untrained": True} if t.untrained else {}),
    }
    if ctx.val is not None:
        s["val"] = {
            "dense_top1": ctx.val_top1(ctx.build(arch), {"params": dense_params}),
            "pruned_before_finetune_top1": t.searched["val_exported_top1"],
            "finetune_top1_by_epoch": stages.finetune_curve(workdir, key="val_top1"),
            "pruned_top1": ctx.val_top1(model, loaded),
        }
    s["macs_ratio"] = round(s["pruned"]["macs"] / s["dense"]["macs"], 4)
    if speeds is None:
        s["speedup"] = round(s["pruned"]["images_per_s"] / s["dense"]["images_per_s"], 3)
    else:
        s.update(speedup_of(speeds))
    s["ideal_speedup"] = round(s["dense"]["macs"] / s["pruned"]["macs"], 3)
    if p_arch.token_points:  # token pruning: batch 1 is where it pays most
        images = ctx.inputs(jnp.asarray(ctx.test.calibration_images(64)))
        dense_b1, pruned_b1 = evaluate_lib.batch1_speeds(
            ctx.build(arch),
            {"params": dense_params},
            model,
            loaded,
            images,
            seconds=config.eval.bench_seconds,
        )
        s["dense"]["images_per_s_batch1"] = round(dense_b1, 1)
        s["pruned"]["images_per_s_batch1"] = round(pruned_b1, 1)
        s["speedup_batch1"] = round(pruned_b1 / dense_b1, 3)
    timed = None
    if config.search.budget_kind == "latency":
        timed = {
            "predicted": round(method.cost.of(arch, p_arch), 4),
            **measured_latency(ctx, arch, dense_params, p_arch, loaded["params"], p_kernels),
        }
    s["budget"] = {
        **budget(
            config.search,
            s["pruned"].get("padded_macs", s["pruned"]["macs"]),
            s["dense"]["macs"],
            timed,
        ),
        **{k: v for k, v in t.search_ends.items() if k != "report"},
    }
    if "report" in t.search_ends:
        s["search_report"] = t.search_ends["report"]
    if not s["budget"]["met"]:
        logging.warning("%s", budget_message(s))
    return s
