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
XNNPACK, no concurrency-optimised scheduler). Writes bench/results/batch1{_T}.{json,md}.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from amap_jax import logs, pipeline, xla_cpu
from amap_jax.models import tokens
from amap_jax.train import evaluate as evaluate_lib
from bench import common, token_speed

_IMAGES = flags.DEFINE_integer("batch1_images", 64, "Test images cycled through.")
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
        ]
    )
    common.write("batch1" + common.suffix(), rows, {"workdir": workdir}, md + "\n")
    print(md)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    common.defaults(rounds=7, seconds=2.0)
    app.run(main)
