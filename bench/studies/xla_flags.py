"""XLA:CPU's library-fusion flags on the dense and the pruned ViT: does any beat the default?

  python -m bench.studies.xla_flags [--model S] [--batch 32] [--widths 45:1099,33:794]
      [--sets default,onednn_dot,...] [--alternations 2] [--rounds 5] [--seconds 4] [--tag TAG]

XLA reads XLA_FLAGS once, when its CPU client starts, so every flag set runs in its own process
on the same models, weights and inputs, the sets taking turns `alternations` times. A process
times the dense model and the pruned ones (every block at `head:hidden` widths), interleaved in
`rounds` rounds of `seconds`, and saves the dense model's logits. Reported per set and model:
images/s over the default set's in the same alternation (median and range over alternations),
the largest logit difference from the default's, and how many library fusions (YNNPACK,
XNNPACK, oneDNN) the compiled dense model holds: a flag that leaves them unchanged did nothing.
A set that fails (a flag this jaxlib does not know) is reported as failed, not skipped.
Writes bench/results/xla_flags_<backend>[_TAG].json and .md.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from amap_jax.timing import interleaved
from bench import common, sides

_NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
# This jaxlib's default hands matrix products and reductions to YNNPACK fusions; oneDNN and
# XNNPACK fusions are only tried with YNNPACK off, which would otherwise take the products.
SETS = {
    "default": "",
    "eigen": _NO_YNN,  # products through XLA's own (Eigen) kernels
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    # YNNPACK reductions (softmax's row max and sum) with XLA's own products
    "ynn_reduce": "--xla_cpu_experimental_ynn_fusion_type=reduce",
    "ynn_dot_eltwise": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise",
    "onednn_dot": f"{_NO_YNN} --xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn_dot": f"{_NO_YNN} --xla_cpu_experimental_xnn_fusion_type=dot",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}
LIBRARIES = ("ynn", "xnn", "onednn")

_SETS = flags.DEFINE_list("sets", list(SETS), f"Flag sets ({', '.join(SETS)}); default first.")
_SET_WORKER = flags.DEFINE_string("set_worker", None, "Internal: time under this flag set.")
_LOGITS = flags.DEFINE_string("logits", None, "Internal: where the worker saves its logits.")


def worker() -> dict:
    import jax

    from amap_jax import models
    from amap_jax.models.arch import vit_arch

    dense = vit_arch(sides.MODEL.value, image_size=sides.IMAGE.value)
    archs = {"dense": dense}
    for w in sides.WIDTHS.value:
        head, hidden = (int(x) for x in w.split(":"))
        archs[w] = common.at_widths(dense, head, hidden)
    b, size = common.BATCH.value, sides.IMAGE.value
    x = jax.random.normal(jax.random.key(1), (b, size, size, 3))
    fns, logits = {}, None
    for name, arch in archs.items():
        net = models.build(arch)
        params = net.init(jax.random.key(0), models.dummy_input(arch))["params"]
        head = params["head"]["kernel"]  # zero at init: logits that say nothing
        params["head"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(2), head.shape)
        fwd = jax.jit(net.apply)
        if name == "dense":
            logits = np.asarray(fwd({"params": params}, x))
            hlo = fwd.lower({"params": params}, x).compile().as_text()
            fused = {lib: hlo.count(f'"kind":"__{lib}_fusion"') for lib in LIBRARIES}
        fns[name] = lambda fwd=fwd, v={"params": params}: jax.block_until_ready(fwd(v, x))
    np.save(_LOGITS.value, logits)
    speeds = interleaved(fns, common.SECONDS.value, common.ROUNDS.value, b)
    return {"images_per_s": {k: float(np.median(v)) for k, v in speeds.items()}, "fusions": fused}


def _run(name: str, logits: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {SETS[name]}".strip()}
    try:
        return sides.run_worker(
            "bench.studies.xla_flags", name, "set_worker", extra=(f"--logits={logits}",), env=env
        )
    except RuntimeError as e:  # reported as failed, not skipped
        return {"error": (str(e).strip().splitlines() or ["(no output)"])[-1][-300:]}


def summarize(runs: dict[str, list[dict]], diffs: dict[str, float]) -> list[dict]:
    """Per set and model: images/s (median over alternations) and its ratio to the default
    set's in the same alternation (median, range)."""
    base, rows = runs["default"], []
    for name, alts in runs.items():
        if any("error" in a for a in alts):
            rows.append({"set": name, "flags": SETS[name], "error": alts[0].get("error")})
            continue
        row = {
            "set": name,
            "flags": SETS[name],
            "library_fusions": alts[0]["fusions"],  # in the compiled dense model
            "max_logit_diff": diffs.get(name),
        }
        for model in alts[0]["images_per_s"]:
            ips = [a["images_per_s"][model] for a in alts]
            ratio = [a / d["images_per_s"][model] for a, d in zip(ips, base, strict=True)]
            row[f"{model} img/s"] = round(float(np.median(ips)), 2)
            row[f"{model} vs default"] = round(float(np.median(ratio)), 3)
            row[f"{model} range"] = [round(min(ratio), 3), round(max(ratio), 3)]
        rows.append(row)
    return rows


def markdown(rows: list[dict], models: list[str]) -> str:
    head = " | ".join(f"{m}: img/s, vs default (range)" for m in models)
    lines = [
        f"| set | XLA_FLAGS | library fusions | {head} | max logit diff |",
        "|---" * (len(models) + 4) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['set']} | `{r['flags']}` | failed: {r['error']} |")
            continue
        cells = " | ".join(
            f"{r[f'{m} img/s']:.2f}, {r[f'{m} vs default']:.2f}x "
            f"({r[f'{m} range'][0]:.2f}-{r[f'{m} range'][1]:.2f})"
            for m in models
        )
        diff = r["max_logit_diff"]
        fused = ", ".join(f"{k} {v}" for k, v in r["library_fusions"].items() if v) or "none"
        lines.append(
            f"| {r['set']} | `{r['flags'] or '(none)'}` | {fused} | {cells} | "
            f"{'-' if diff is None else f'{diff:.1e}'} |"
        )
    return "\n".join(lines) + "\n"


def main(_):
    if _SET_WORKER.value:
        print(json.dumps(worker()))
        return
    names = _SETS.value
    unknown = sorted(set(names) - set(SETS))
    if unknown or names[0] != "default":
        raise app.UsageError(f"--sets: 'default' first, then some of {list(SETS)}; got {names}")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    diffs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(sides.ALTERNATIONS.value):
            for name in names:
                t = time.time()
                path = os.path.join(tmp, f"{name}.npy")
                runs[name].append(_run(name, path))
                print(
                    f"alternation {k + 1}/{sides.ALTERNATIONS.value}: {name} "
                    f"{time.time() - t:.0f} s",
                    flush=True,
                )
                if os.path.exists(path) and name != "default":
                    ref = np.load(os.path.join(tmp, "default.npy"))
                    diffs[name] = float(np.max(np.abs(np.load(path) - ref)))
    rows = summarize(runs, diffs)
    models = ["dense", *sides.WIDTHS.value]
    meta = {
        "model": f"ViT-{sides.MODEL.value}/16",
        "image_size": sides.IMAGE.value,
        "batch": common.BATCH.value,
        "alternations": sides.ALTERNATIONS.value,
        "rounds": common.ROUNDS.value,
        "seconds": common.SECONDS.value,
        "affinity": sorted(os.sched_getaffinity(0)),
    }
    name = f"xla_flags_{_backend()}{common.suffix()}"
    md = markdown(rows, models)
    common.write(name, rows, meta, md)
    print(md)


def _backend() -> str:
    import jax

    return jax.default_backend()


if __name__ == "__main__":
    common.defaults(batch=32, seconds=4.0)
    common.run(main)
