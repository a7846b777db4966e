"""Where DeiT-S token dropping's time goes, and what bounds it: `bench.batch1`'s ladder on
`bench.token_speed`'s models.

  python -m bench.token_ladder [--token_batches 1,64] [--rounds 5] [--seconds 2] [--tag T]

For AS-ViT and AMAP+AS-ViT (DeiT-S/16 at 224, random weights, thresholds that keep
`--token_fractions` of the patch tokens before `--token_points`, AMAP's widths at
`--token_amap_target`, as `bench.token_speed` builds them), each batch size runs the program
built up part by part at static token counts (the mean kept counts rounded up) against the
dense model, interleaved: the blocks alone at those counts (the bound: no dropping program
runs faster, and a batch of images that keep different counts costs at least its mean), then
+ statistics, + scores, + sort and gather, and the dropping program itself (buckets, switch,
parts). Speedups are divided by the MACs ideal at the same counts, so a row reads as the
fraction of the ideal that step reaches. Writes bench/results/token_ladder{_T}.{json,md}.
"""

from __future__ import annotations

import time

import numpy as np
from absl import logging

from amap_jax import logs, models, xla_cpu
from bench import batch1, common, sides, token_speed


def ladders(built) -> tuple[list[dict], dict]:
    """Rows (model, batch, step, speedup, of ideal) and the ideal of each model."""
    dense, dense_params = built["dense"]
    points, sets = built["points"], built["kernels"]
    dense_model = models.build(dense)
    rows, ideals = [], {}
    for name in ("asvit", "amap+asvit"):
        model, params, counts = built[name]
        model = model.clone(arch=model.arch.replace(token_groups=token_speed._GROUPS.value))
        sizes = [model.arch.num_prefix + int(np.ceil(c)) for c in counts.mean(0)]
        # at the static counts the ladder runs: what its steps are measured against
        mean = np.asarray(sizes, float)[None] - model.arch.num_prefix
        ideals[name] = token_speed.ideal(dense, built["counted"][name], points, mean)
        jits = (
            lambda f: xla_cpu.jit(f, sets["dense"]),
            lambda f, n=name: xla_cpu.jit(f, sets[n]),
        )
        for b in token_speed._batch_sizes():
            t = time.perf_counter()
            steps = batch1.ladder(
                dense_model,
                {"params": dense_params},
                model,
                {"params": params},
                built["images"],
                sizes,
                batch=b,
                jits=jits,
            )
            print(f"{name} batch {b}: {time.perf_counter() - t:.0f} s")
            for s in steps:
                of = s["speedup"] / ideals[name]
                rows.append({"model": name, "batch": b, "sizes": sizes, **s, "of_ideal": of})
                print(f"  {s['step']:8s} {s['speedup']:.3f}x  {of:.2f} of ideal")
    return rows, ideals


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"{meta['model']} at {meta['image_size']} px, float32, points {meta['points']}, random "
        f"weights; each step against the dense model in the same rounds ({meta['rounds']} "
        f"rounds, medians of the ratios, {meta['cpus']} CPUs, kernel sets {meta['kernels']}). "
        "Tokens from each point on: the mean kept counts rounded up, prefix included "
        f"({meta['sizes']}); ideal: dense MACs over the MACs at those counts "
        f"({meta['ideals']}). A batch runs the program in {meta['groups']} parts.",
        "",
        "| model | batch | step | adds | speedup | of ideal | launches |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["step"] == "dense":
            continue
        launches = r["launches"] if r["batch"] == 1 else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['step']} | {batch1.STEP_TEXT[r['step']]} | "
            f"{r['speedup']:.3f}x | {r['of_ideal']:.2f} | {launches} |"
        )
    lines += [
        "",
        "The blocks alone bound every dropping program: where their row is under a target "
        "fraction of the ideal, no program reaches it on this machine. Launches: top-level "
        "operations of the optimised HLO one image runs through (batch 1; a batch in parts "
        "loops over them).",
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    logs.setup()
    t = time.perf_counter()
    built = token_speed.setup()
    print(f"models and thresholds: {time.perf_counter() - t:.0f} s; kernels {built['kernels']}")
    rows, ideals = ladders(built)
    dense = built["dense"][0]
    meta = {
        "model": f"{dense.name} (timm {sides.TIMM[sides.MODEL.value]})",
        "image_size": dense.image_size,
        "points": list(built["points"]),
        "fractions": [float(f) for f in token_speed._FRACTIONS.value],
        "sizes": {r["model"]: r["sizes"] for r in rows},
        "ideals": {k: round(v, 3) for k, v in ideals.items()},
        "groups": token_speed._GROUPS.value,
        "kernels": built["kernels"],
        "rounds": common.ROUNDS.value,
        "seconds": common.SECONDS.value,
        "cpus": common.cpus(),
    }
    md = markdown(meta, rows)
    path = common.write(f"token_ladder{common.suffix()}", rows, meta, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.defaults(rounds=5, seconds=2.0)
    common.run(main)
