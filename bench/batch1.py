"""Batch 1 of a token-pruned run: its export against its dense model, and what bounds it.

  python -m bench.batch1 --workdir W [--rounds 7] [--seconds 2] [--batch1_images 64]
      [--options default,xla,...] [--tag T]

Reads W's finished export (AS-ViT or AMAP+AS-ViT) and dense model and times batch 1 on test
images, one image per call, the two interleaved round by round (`evaluate.batch1_speeds`: what
`speedup_batch1` in summary.json reports), with the ideal beside it (dense MACs over the mean
MACs of the export at the counts those images keep). Beside it, the kernels each compiled
program launches per image, counted in the optimised HLO (its top-level operations): on CPU at
batch 1 a small model is bound by launches, not by MACs, and every pruning point adds some
(score, sort, gather, bucket choice) that no block saves. `--options` repeats it under other
XLA:CPU compiler options, both programs alike: the kernel sets an export can carry
(`amap_jax.xla_cpu`) and ones aimed at per-kernel overhead at batch 1 (no Eigen thread pool,
XNNPACK, no concurrency-optimised scheduler). Beside them, a ladder that builds the program
up part by part at static token counts (the mean kept counts), timed against the dense model
in the same rounds: the blocks alone (the bound: no dropping program runs faster), + the
statistics the scores need, + the scores and masks, + the sort, gather and key mask, and the
program itself (+ buckets and switch). Writes bench/results/batch1{_T}.{json,md}.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from amap_jax import logs, pipeline, timing, xla_cpu
from amap_jax.models import tokens
from amap_jax.train import evaluate as evaluate_lib
from bench import common, token_speed

_IMAGES = flags.DEFINE_integer("batch1_images", 64, "Test images cycled through.", lower_bound=1)
# Options aimed at what a kernel costs beyond its arithmetic, beside the export's kernel sets.
OVERHEAD = {
    "no_eigen_threads": {"xla_cpu_multi_thread_eigen": False},
    "xnnpack": {"xla_cpu_use_xnnpack": True},
    "no_concurrency": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
}
OPTIONS = {**xla_cpu.SETS, **OVERHEAD}
_OPTIONS = flags.DEFINE_list(
    "options", ["default"], f"XLA:CPU option sets, one row each: {', '.join(OPTIONS)}."
)

STEP_TEXT = {
    "dense": "the dense model",
    "blocks": "the blocks at the kept counts, first tokens kept (the bound)",
    "stats": "class attention and head norms before each point",
    "gate": "scores and keep masks",
    "sort": "kept-first sort, gather, key mask",
    "program": "buckets and switch: the dropping program",
}
_FREE = ("parameter", "constant", "get-tuple-element", "bitcast", "tuple")


def computations(hlo: str) -> dict[str, list[str]]:
    """Name -> the operations of each computation in optimised HLO text (ENTRY as 'ENTRY')."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = "ENTRY" if head.group(1) else head.group(2)
            out[name] = []
        elif name is not None:
            op = re.match(r"\s+(?:ROOT )?%?\S+ = .*? ([a-z][\w\-]*)\(", line)
            if op and op.group(1) not in _FREE:
                out[name].append(line)
    return out


def launches(hlo: str) -> tuple[int, float]:
    """(top-level operations of the entry computation, mean operations of a conditional's
    branch: what one pruning point's segment launches)."""
    comps = computations(hlo)
    branches = []
    for line in comps["ENTRY"]:
        m = re.search(r"branch_computations=\{([^}]*)\}", line)
        if m:
            names = [n.strip().lstrip("%") for n in m.group(1).split(",")]
            branches += [len(comps[n]) for n in names if n in comps]
    return len(comps["ENTRY"]), float(np.mean(branches)) if branches else 0.0


STEPS = ("blocks", "stats", "gate", "sort")  # the ladder: what each adds of the program


def cut(model, sizes, step: str = "blocks"):
    """`(variables, images) -> logits` with `sizes[k]` tokens (prefix first) from the k-th
    pruning point on, static sizes (no bucket, no switch), adding the dropping program's parts
    up to `step`: "blocks" the blocks alone, the first tokens kept (a bound: nothing that
    drops tokens runs faster); "stats" + the class attention and head norms of the block
    before each point; "gate" + the scores and keep masks; "sort" + the kept-first sort, the
    gather of the kept tokens and the key mask of the later blocks."""
    arch, level = model.arch, STEPS.index(step)
    bounds = (0, *arch.token_points, len(arch.blocks))

    def fn(m, images):
        x, keep, stats, extra = m.embed(images), None, None, 0.0
        for k in range(1, len(bounds)):
            size = sizes[k - 2] if k > 1 else None
            if size and level == 3:
                mask = m.token_gate(k - 2, stats, keep)
                iota = jax.lax.broadcasted_iota(jnp.int32, mask.shape, 1)
                dropped, slots = jax.lax.sort((-mask, iota), num_keys=1, is_stable=True)
                x = jnp.take_along_axis(x, slots[:, :size, None], 1, mode="promise_in_bounds")
                keep = -dropped[:, :size]
            elif size:
                if level == 2:
                    extra = extra + jnp.sum(m.token_gate(k - 2, stats, None))
                elif level == 1:
                    extra = extra + sum(jnp.sum(t) for t in stats)
                x = x[:, :size]
            last = k == len(bounds) - 1
            x, stats = m.run(x, bounds[k - 1], bounds[k], keep, stats=level >= 1 and not last)
        return m.logits(x) + 0.0 * extra  # keeps what `extra` sums in the program

    return lambda variables, images: model.apply(variables, images, method=fn)


def ladder(
    dense_model, dense, model, variables, images, sizes, *, batch=1, groups=None, jits=None
) -> list[dict]:
    """Batches of `batch` through each `cut` step and through the dropping program (in
    `groups` parts; None, the architecture's) against the dense model, all interleaved
    (medians of the same-round ratios), with their launches. `jits`: (dense, pruned) jit
    functions (a kernel set), else `jax.jit`."""
    jit_dense, jit = jits or (jax.jit, jax.jit)
    fns = {"dense": (jit_dense(dense_model.apply), dense)}
    fns |= {step: (jit(cut(model, sizes, step)), variables) for step in STEPS}
    fns["program"] = (jit(tokens.dropping(model, groups=groups)), variables)
    batches = [images[i : i + batch] for i in range(0, min(len(images), 64 * batch), batch)]
    batches = [b for b in batches if len(b) == batch]
    speeds = timing.interleaved(
        {
            name: timing.cycling(lambda x, f=f, v=v: f(v, x), batches)
            for name, (f, v) in fns.items()
        },
        common.SECONDS.value,
        common.ROUNDS.value,
        batch=batch,
    )
    rows = []
    for name, (f, v) in fns.items():
        if name == "dense":
            continue
        entry, segment = launches(f.lower(v, batches[0]).compile().as_text())
        points = len(model.arch.token_points) if name == "program" else 0
        ratios = np.asarray(speeds[name]) / np.asarray(speeds["dense"])
        rows.append(
            {
                "step": name,
                "images_per_s": round(float(np.median(speeds[name])), 1),
                "us_per_image": round(1e6 / float(np.median(speeds[name])), 1),
                "speedup": round(float(np.median(ratios)), 3),
                "launches": round(entry + points * segment),
            }
        )
    dense_us = 1e6 / float(np.median(speeds["dense"]))
    return [{"step": "dense", "us_per_image": round(dense_us, 1), "speedup": 1.0}, *rows]


def optimised_hlo(fn, variables, x, options=None) -> str:
    return jax.jit(fn, compiler_options=options).lower(variables, x).compile().as_text()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    logs.setup()
    workdir = common.WORKDIR.value
    config, ctx, arch, model, variables = common.token_run(workdir)
    dense_model, dense = ctx.build(arch), {"params": pipeline.train_dense(ctx, arch)}
    images = ctx.inputs(jnp.asarray(ctx.test.calibration_images(_IMAGES.value)))
    one = images[:1]

    counts = np.asarray(tokens.predict(model, variables, images)[1])  # patch tokens kept
    ideal = token_speed.ideal(arch, model.arch, model.arch.token_points, counts)
    unknown = [o for o in _OPTIONS.value if o not in OPTIONS]
    if unknown:
        raise app.UsageError(f"unknown --options {unknown}; known: {', '.join(OPTIONS)}")
    points = len(model.arch.token_points)
    rows = []
    for name in _OPTIONS.value:
        options = OPTIONS[name] or None
        d_speed, p_speed = evaluate_lib.batch1_speeds(
            dense_model,
            dense,
            model,
            variables,
            images,
            seconds=common.SECONDS.value * common.ROUNDS.value,
            rounds=common.ROUNDS.value,
            compiler_options=options,
        )
        dense_ops, _ = launches(optimised_hlo(dense_model.apply, dense, one, options))
        entry, segment = launches(optimised_hlo(tokens.dropping(model), variables, one, options))
        rows.append(
            {
                "workdir": workdir,
                "method": config.method,
                "options": name,
                "compiler_options": OPTIONS[name],
                "tokens": arch.num_tokens,
                "kept_patch_tokens_mean": [round(float(x), 2) for x in counts.mean(0)],
                "dense_images_per_s": round(d_speed, 1),
                "pruned_images_per_s": round(p_speed, 1),
                "speedup": round(p_speed / d_speed, 3),
                "ideal": round(ideal, 3),
                "dense_launches": dense_ops,
                "pruned_launches": round(entry + points * segment),
                "pruned_launches_outside_segments": entry,
                "pruned_launches_per_segment": round(segment, 1),
                "blocks": len(arch.blocks),
            }
        )
        logging.warning("%s: speedup %.3fx", name, rows[-1]["speedup"])
    sizes = [arch.num_prefix + int(np.ceil(c)) for c in counts.mean(0)]
    steps = ladder(dense_model, dense, model, variables, images, sizes)
    logging.warning("ladder: %s", steps)
    md = "\n".join(
        [
            "# Batch 1 of a token-pruned export against its dense model",
            "",
            f"`python -m bench.batch1 --workdir {workdir} --options {','.join(_OPTIONS.value)}` "
            f"({common.cpus()} CPUs, float32, {common.ROUNDS.value} interleaved rounds, medians; "
            f"{config.method}, {arch.num_tokens} tokens, kept patch tokens per point "
            f"{rows[0]['kept_patch_tokens_mean']}, ideal {rows[0]['ideal']:.2f}x).",
            "",
            "| XLA:CPU options | images/s dense | images/s pruned | speedup | launches dense | "
            "launches pruned (outside segments + points x segment) |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r['options']} | {r['dense_images_per_s']:.0f} | "
                f"{r['pruned_images_per_s']:.0f} | {r['speedup']:.3f}x | {r['dense_launches']} | "
                f"{r['pruned_launches']} ({r['pruned_launches_outside_segments']} + {points} x "
                f"{r['pruned_launches_per_segment']:.0f}) |"
                for r in rows
            ),
            "",
            "Launches: top-level operations of the optimised HLO that one image runs through "
            "(the dropping program: outside its segments plus one segment per pruning point). "
            "Options: " + "; ".join(f"{n} {OPTIONS[n] or '(none)'}" for n in _OPTIONS.value) + ".",
            "",
            f"Where batch 1 goes (default options): the program built up part by part at "
            f"static token counts, {sizes} tokens from each point on (the mean kept counts "
            "rounded up, no bucket, no switch), against the dense model, interleaved:",
            "",
            "| step | adds | us per image | speedup | launches |",
            "|---|---|---|---|---|",
            *(
                f"| {r['step']} | {STEP_TEXT[r['step']]} | {r['us_per_image']:.0f} | "
                f"{r['speedup']:.3f}x | {r.get('launches', '-')} |"
                for r in steps
            ),
            "",
            "The blocks alone at the kept counts bound every dropping program from above.",
        ]
    )
    meta = {"workdir": workdir, "ladder": steps}
    common.write("batch1" + common.suffix(), rows, meta, md + "\n")
    print(md)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    common.defaults(rounds=7, seconds=2.0)
    common.run(main)
