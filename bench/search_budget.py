"""Does the search land on its target? The MACs ratio of the search's own result (`search_end`)
against the target, per config, target and search length, for the default budget mechanism and
the alternatives tried, with the share the final fix-up had to remove and top-1 right after the
search (before fine-tuning).

  python -m bench.search_budget [--configs vit,flatten] [--targets 0.7,0.5,0.3]
      [--epochs 0.25,1] [--variants default,penalty,...] [--root workdirs/search_budget]
      [--jobs 0]

Each config's dense model is trained once (its own train stage, seed 0) under ROOT/<config> and
shared by every cell; configs run in parallel processes (`--jobs`). Writes
bench/results/search_budget.{json,md}.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import multiprocessing
import os
import shutil
import tempfile
import time

from absl import flags, logging

from amap_jax import logs, methods, pipeline
from amap_jax.pruning import macs
from bench import common

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "vit": "configs/fmnist_amap_vit.py",
    "flatten": "configs/fmnist_amap_flatten.py",
    "tokens": "configs/fmnist_tokens.py",  # method amap+asvit (its joint budget)
}
# The default, and what was tried on the way to it (each a set of overrides).
VARIANTS = {
    "default (projection)": {},
    "projection: cost shift + per-channel Adam (before)": {
        "amap.budget_shift": "cost",
        "amap.indicator_moments": "per_channel",
    },
    "lagrange (multiplier)": {"amap.budget": "lagrange"},
    "penalty + ramp + scaled rate": {"amap.budget": "penalty"},
    "penalty, fixed rate (before)": {
        "amap.budget": "penalty",
        "amap.target_ramp": 0.0,
        "amap.indicator_lr": 0.05,
    },
}

_ROOT = flags.DEFINE_string("root", "workdirs/search_budget", "Dense models and scratch runs.")
_CONFIGS = flags.DEFINE_list("configs", ["vit", "flatten"], f"Configs ({', '.join(CONFIGS)}).")
_EPOCHS = flags.DEFINE_list("epochs", ["0.25", "1"], "Search lengths (epochs).")
common.check_list(_EPOCHS, float, lambda e: e > 0, "search lengths in epochs (> 0)")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Budget mechanisms.")
_JOBS = flags.DEFINE_integer(
    "jobs", 0, "Configs searched at once, one process each (0: a CPU each).", lower_bound=0
)


def load_config(name: str):
    path = os.path.join(ROOT_DIR, CONFIGS[name])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    if name == "tokens":
        c.method = "amap+asvit"
    return c


def apply(config, overrides: dict):
    c = config.copy_and_resolve_references()
    for key, value in overrides.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


def cell(
    name: str, variant: str, target: float, epochs: float, dense_cache: dict, root: str
) -> dict:
    """One search on the config's shared dense model."""
    c = apply(load_config(name), VARIANTS[variant])
    c.search.target, c.search.epochs = target, epochs
    if name not in dense_cache:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        ctx, arch = pipeline.make_context(c, os.path.join(root, name))
        dense_cache[name] = (pipeline.train_dense(ctx, arch), ctx.evaluate)
    dense, evaluate = dense_cache[name]
    scratch = tempfile.mkdtemp(dir=root)
    ctx, arch = pipeline.make_context(c, scratch)
    method = methods.from_config(c)
    t = time.perf_counter()
    variables, model, ends = pipeline.search(ctx, arch, dense, method)
    seconds = time.perf_counter() - t
    shutil.rmtree(scratch)
    p_arch, _ = method.export(arch, variables)
    return {
        "config": name,
        "variant": variant,
        "target": target,
        "epochs": epochs,
        "steps": ctx.steps(c.search)[0],
        "search_end": ends["search_end"],
        "off_by": round(ends["search_end"] - target, 4),
        "fixup": ends["fixup"],
        "final": round(macs.ratio(arch, p_arch), 4),
        "top1_after_search": round(evaluate(model, variables)["top1"], 2),
        "seconds": round(seconds, 1),
    }


def report(rows: list[dict]) -> str:
    lines = [
        "# Does the search land on its target?",
        "",
        "`python -m bench.search_budget` (Fashion-MNIST, seed 0). `search_end`: MACs ratio of the",
        "search's own masks; `fixup`: dense-MACs share the final trim removed; top-1 right after",
        "the search, before fine-tuning.",
        "",
        "| config | variant | target | search epochs (steps) | search_end | off by | fixup | "
        "top-1 after search |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['variant']} | {r['target']} | {r['epochs']} ({r['steps']}) "
            f"| {r['search_end']:.3f} | {r['off_by']:+.3f} | {r['fixup']:.3f} | "
            f"{r['top1_after_search']:.2f} |"
        )
    worst = {}
    for r in rows:
        key = r["variant"]
        worst[key] = max(worst.get(key, 0.0), abs(r["off_by"]))
    lines += ["", "Largest |search_end - target| per variant: " + ", ".join(
        f"{k} {v:.3f}" for k, v in worst.items()
    ) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def config_rows(name: str, variants: list, epochs: list, targets: list, root: str) -> list:
    """Every cell of one config, in order (one process: the config's dense model is shared)."""
    logging.set_verbosity(logging.WARNING)  # as train.py: library INFO chatter off
    rows, cache = [], {}
    for variant in variants:
        for e in epochs:
            for target in targets:
                rows.append(cell(name, variant, target, e, cache, root))
                print(common.table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    logs.setup()
    os.makedirs(_ROOT.value, exist_ok=True)
    epochs, targets = list(map(float, _EPOCHS.value)), list(map(float, common.TARGETS.value))
    args = [(n, _VARIANTS.value, epochs, targets, _ROOT.value) for n in _CONFIGS.value]
    jobs = min(_JOBS.value or common.cpus(), len(args))
    if jobs > 1:  # one process per config; spawned, as a forked JAX process is not safe
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            per_config = list(pool.map(config_rows, *zip(*args, strict=True)))
    else:
        per_config = [config_rows(*a) for a in args]
    rows = [r for rs in per_config for r in rs]
    meta = {"configs": _CONFIGS.value, "epochs": _EPOCHS.value, "targets": common.TARGETS.value}
    common.write("search_budget" + common.suffix(), rows, meta, report(rows))
    print(report(rows))


if __name__ == "__main__":
    common.defaults(targets=["0.7", "0.5", "0.3"])
    common.run(main)
