"""Which tokens a token-pruned model keeps: counts per image and the patches that survive.

  python -m bench.kept_tokens --workdir W [--images 8] [--tag T]

Reads W's finished export (AS-ViT or AMAP+AS-ViT) and config, and runs the exported model's
masked forward pass, whose keep decisions are those of the dropping one, over the test split.
Writes bench/results/kept_tokens{_T}.json (per point: mean, sd, percentiles, the share of
images below each bucket size), kept_tokens{_T}.png (histogram of kept patch tokens per image
at every pruning point) and surviving_patches{_T}.png (test images with dropped patches in blue).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from amap_jax import logs
from amap_jax.models import tokens
from bench import common

_IMAGES = flags.DEFINE_integer("images", 8, "Test images in the picture.", lower_bound=1)
DROPPED_COLOUR = np.array([0.35, 0.55, 0.95])


def keep_masks(model, inputs):
    """(variables, images) -> [B, points, patch tokens] keep mask of each image at each
    pruning point; compiled once, for every batch."""

    @jax.jit
    def masks(variables, images):
        _, reports = model.apply(variables, inputs(images), mutable=[tokens.REPORTS])
        keeps = reports[tokens.REPORTS]["token_gate"]["keep"]
        return jnp.stack([k[:, model.arch.num_prefix :] for k in keeps], 1)

    return masks


def collect(workdir: str, n_images: int = 8):
    """(arch, [images, points, tokens] masks over the test split, the first test images, their
    masks, labels, logits)."""
    config, ctx, _, model, variables = common.token_run(workdir)
    masks = keep_masks(model, ctx.inputs)
    out = []
    for batch in ctx.test.eval_batches(config.eval.batch_size):
        real = np.asarray(batch.get("mask", np.ones(len(batch["image"])))) > 0
        out.append(np.asarray(masks(variables, batch["image"]))[real])
    first = next(iter(ctx.test.eval_batches(n_images)))
    shown = np.asarray(ctx.inputs(jnp.asarray(first["image"])))
    logits = np.asarray(jax.jit(model.apply)(variables, ctx.inputs(jnp.asarray(first["image"]))))
    return model.arch, np.concatenate(out), shown, first["label"], logits


def summarize(arch, masks: np.ndarray) -> list[dict]:
    counts = masks.sum(-1)
    rows = []
    for k, point in enumerate(arch.token_points):
        c = counts[:, k]
        rows.append(
            {
                "point": int(point),
                "of": int(arch.grid**2),
                "mean": round(float(c.mean()), 2),
                "sd": round(float(c.std()), 2),
                "min": int(c.min()),
                "p10": float(np.percentile(c, 10)),
                "median": float(np.median(c)),
                "p90": float(np.percentile(c, 90)),
                "max": int(c.max()),
                # where the batch-64 runner's bucket (multiple of 8) pads this image
                "mean_bucket_padding": round(float(np.mean(-c % 8)), 2),
            }
        )
    return rows


def plot(arch, masks, shown, labels, logits, rows, out: str, suffix: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = masks.sum(-1)
    n_pts = len(arch.token_points)
    fig, axes = plt.subplots(1, n_pts, figsize=(4.2 * n_pts, 3.4), squeeze=False)
    for k, ax in enumerate(axes[0]):
        ax.hist(counts[:, k], bins=np.arange(0, arch.grid**2 + 2) - 0.5, color=f"C{k}")
        ax.axvline(rows[k]["mean"], color="k", lw=1, label=f"mean {rows[k]['mean']:.1f}")
        ax.set_title(f"before block {arch.token_points[k]}")
        ax.set_xlabel(f"patch tokens kept (of {arch.grid**2})")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"test images (of {len(counts)})")
    fig.tight_layout()
    paths = [os.path.join(out, f"kept_tokens{suffix}.png")]
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    g, p = arch.grid, arch.patch_size
    shown_masks = masks[: len(shown)]
    fig, axes = plt.subplots(
        n_pts, len(shown), figsize=(1.6 * len(shown), 1.8 * n_pts), squeeze=False
    )
    for i in range(len(shown)):
        img = shown[i].mean(-1)
        img = (img - img.min()) / (img.max() - img.min() + 1e-12)
        for k in range(n_pts):
            ax = axes[k][i]
            keep = shown_masks[i, k].reshape(g, g)
            dropped = np.kron(1 - keep, np.ones((p, p)))[..., None]
            rgb = np.repeat(img[..., None], 3, -1)
            ax.imshow((1 - 0.7 * dropped) * rgb + 0.7 * dropped * DROPPED_COLOUR)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ok = "ok" if int(np.argmax(logits[i])) == int(labels[i]) else "wrong"
                ax.set_title(f"{int(keep.sum())} kept, {ok}", fontsize=7)
            else:
                ax.set_title(f"{int(keep.sum())} kept", fontsize=7)
            if i == 0:
                ax.set_ylabel(f"block {arch.token_points[k]}", fontsize=8)
    fig.suptitle("dropped patches in blue", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out, f"surviving_patches{suffix}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(_):
    logging.set_verbosity(logging.WARNING)
    logs.setup()
    arch, masks, shown, labels, logits = collect(
        os.path.abspath(common.WORKDIR.value), _IMAGES.value
    )
    rows = summarize(arch, masks)
    suffix = common.suffix()
    path = common.write(f"kept_tokens{suffix}", rows, {"workdir": common.WORKDIR.value})
    pngs = plot(arch, masks, shown, labels, logits, rows, common.out_dir(), suffix)
    for r in rows:
        print(
            f"before block {r['point']}: kept {r['mean']:.1f} ± {r['sd']:.1f} of {r['of']} "
            f"(min {r['min']}, median {r['median']:.0f}, max {r['max']})"
        )
    print(f"wrote {path}, " + ", ".join(os.path.basename(p) for p in pngs))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    common.run(main)
