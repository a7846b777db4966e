"""Which method to pick: every method from the same dense model per seed, in regimes where the
choice matters, with paired 95% intervals.

  python -m bench.compare [--grid channels] [--jobs 2] [--root workdirs/compare]
  python -m bench.compare --grid extras    # AMAP ablations and VTP variants
  python -m bench.compare --grid tokens    # AMAP, AS-ViT and AMAP+AS-ViT at matched MACs
  python -m bench.compare --quick          # a 10-minute version, to try it
  python -m bench.compare --report_only    # the report from the cells finished so far
  python -m bench.compare --grid_configs vit --grid_targets 0.3,0.7  # part of a grid

A seed fixes the dense model's initialisation and data order (one dense checkpoint per config
and seed, shared by every method of that seed), the calibration images, the search and
fine-tune data order, and random's masks: cells of one seed are paired. A cell is one run from
its seed's dense checkpoint: search (0.5 epoch) -> export -> fine-tune (2 epochs, distilled from
that dense model), with top-1 right after the search, after fine-tune epoch 1 and at the end
(one run, evaluated along). The equal-budget dense model trains the same extra epochs with the
fine-tuning recipe from the same checkpoint, evaluated at the same points.

Cells run in parallel processes, one per core (`--jobs`, pinned with taskset), each in its own
work directory under ROOT: a finished cell is read back, a killed one resumes from its
checkpoints. The remaining time is estimated from the cells finished so far.

Writes compare_<grid>.{json,md} (into workdirs/bench/, or bench/results/ with
--update_results) and compare_<grid>_top1.png (top-1 against the
achieved MACs ratio, 95% intervals, a panel per config and fine-tuning budget) and, for channel
grids, compare_<grid>_widths.png (kept widths per layer at the lowest target).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

from amap_jax import logs, pipeline
from amap_jax import workdir as workdir_lib
from amap_jax.io import trees
from bench import common, stats

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "vit": "configs/fmnist_amap_vit.py",
    "flatten": "configs/fmnist_amap_flatten.py",
    "tokens": "configs/fmnist_tokens.py",
}
DENSE = "dense"  # a (config, seed)'s dense model: what every cell of that seed starts from
BUDGET = "dense, equal budget"
STAGES = ("after search", "after 1 fine-tune epoch", "end")
# Every cell of every grid: a search short enough that the choice of channels shows.
SCHEDULE = {"eval.bench_seconds": 0.2}  # the configs own schedule; speed is not measured here


@dataclasses.dataclass(frozen=True)
class Grid:
    configs: tuple[str, ...]
    targets: tuple[float, ...]
    variants: dict  # name -> (method, {setting: value})
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    schedule: dict = dataclasses.field(default_factory=lambda: dict(SCHEDULE))
    reference: str = "amap"  # what every variant is paired with
    cost: str = ""
    # The split the report reads: "test" (reported numbers) or "val" (a grid that chooses a
    # default reads the validation split only). Every cell records both.
    split: str = "test"
    # Equal-budget dense models (the channel grid's schedule): a grid that changes the
    # schedule has none of its own, since they share their work directories across grids.
    equal_budget: bool = True


METHODS = {m: (m, {}) for m in ("amap", "vtp", "magnitude", "random")}
GRIDS = {
    "channels": Grid(("vit", "flatten"), (0.7, 0.5, 0.3), METHODS, cost="about 4 hours on 2 cores"),
    "extras": Grid(
        ("flatten",),
        (0.3,),
        {
            "amap": ("amap", {}),
            "vtp": ("vtp", {}),
            "amap: linear_qk=shift": ("amap", {"amap.linear_qk": "shift"}),
            "amap: linear_qk=difference": ("amap", {"amap.linear_qk": "difference"}),
            "amap: no similarity": ("amap", {"amap.similarity": False}),
            "amap: no reweight": ("amap", {"amap.reweight": False}),
            "amap: init=constant": ("amap", {"amap.init": "constant"}),
            "amap: init=attn_diff": ("amap", {"amap.init": "attn_diff"}),
            "amap: no head balancing": ("amap", {"amap.head_balanced": False}),
            "vtp: fold_scores": ("vtp", {"vtp.fold_scores": True}),
            "vtp: l1 1e-5": ("vtp", {"vtp.l1_weight": 1e-5}),
            "vtp: l1 1e-3": ("vtp", {"vtp.l1_weight": 1e-3}),
        },
        cost="about 1.5 hours on 2 cores (with the channel grid's dense models)",
    ),
    "tokens": Grid(
        ("tokens",),
        (0.5,),
        {m: (m, {}) for m in ("amap", "asvit", "amap+asvit")},
        # measured: a dense model 22 min on one core, an AMAP cell 7, an AS-ViT cell 10
        cost="about 2-2.5 hours on 2 cores",
    ),
    # Which q/k signal for focused linear attention (`amap.linear_qk`): the search alone,
    # read on the validation split, to choose the default.
    "linear_qk": Grid(
        ("flatten",),
        (0.5, 0.3),
        {
            f"search only: {v}": ("vtp", {}) if v == "vtp" else ("amap", {"amap.linear_qk": v})
            for v in ("difference", "exempt", "shift", "vtp")
        },
        # a pre-screen: the extras grid measures the choice at 5 seeds with fine-tuning
        seeds=(0, 1),
        schedule={**SCHEDULE, "finetune.epochs": 0.0},
        reference="search only: shift",
        cost="about 20 minutes on 2 cores (with the channel grid's dense models)",
        split="val",
        equal_budget=False,
    ),
    "quick": Grid(
        ("vit",),
        (0.5,),
        {m: (m, {}) for m in ("amap", "random")},
        seeds=(0, 1),
        schedule={
            "train.epochs": 1.0,
            "search.epochs": 0.25,
            "finetune.epochs": 1.0,
            "eval.bench_seconds": 0.1,
        },
        cost="about 10 minutes on 2 cores",
    ),
}

_GRID = flags.DEFINE_enum("grid", "channels", list(GRIDS), "Which grid.")
_QUICK = flags.DEFINE_bool("quick", False, "Same as --grid=quick.")
_ROOT = flags.DEFINE_string("root", "workdirs/compare", "Where the cells' work directories go.")
_JOBS = flags.DEFINE_integer(
    "jobs", 0, "Cells at once, one per core (0: every core).", lower_bound=0
)
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default: the grid's).")
_CONFIGS = flags.DEFINE_list("grid_configs", None, "Only these of the grid's configs (same cells).")
_TARGETS = flags.DEFINE_list("grid_targets", None, "Only these of the grid's targets (same cells).")
_VARIANTS = flags.DEFINE_list(
    "grid_variants", None, "Only these of the grid's methods and variants (same cells)."
)
_SET = flags.DEFINE_list("set", [], "KEY=VALUE settings for every run of the grid, written down.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only the report, from finished cells.")
_CELL = flags.DEFINE_string("cell", None, "Run this one cell (JSON; used by the workers).")


@dataclasses.dataclass(frozen=True)
class Cell:
    config: str
    variant: str
    target: float
    seed: int

    @property
    def name(self) -> str:
        if self.variant == DENSE:
            return f"dense_s{self.seed}"
        slug = self.variant.replace(": ", "_").replace(" ", "_").replace("=", "-").replace(",", "")
        return f"{slug}_t{self.target}_s{self.seed}"

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.config, self.name)


def grid() -> Grid:
    g = GRIDS["quick" if _QUICK.value else _GRID.value]
    if _SEEDS.value:
        bad = [s for s in _SEEDS.value if not s.isdigit()]
        if bad:
            raise app.UsageError(f"--seeds: {bad} are not seeds (integers >= 0)")
        g = dataclasses.replace(g, seeds=tuple(int(s) for s in _SEEDS.value))
    if _CONFIGS.value:
        unknown = sorted(set(_CONFIGS.value) - set(g.configs))
        if unknown:
            raise app.UsageError(f"--grid_configs: {unknown} not in the grid's {list(g.configs)}")
        g = dataclasses.replace(g, configs=tuple(c for c in g.configs if c in _CONFIGS.value))
    if _TARGETS.value:
        try:
            want = {float(t) for t in _TARGETS.value}
        except ValueError:
            raise app.UsageError(f"--grid_targets: {_TARGETS.value} are not numbers") from None
        if not want <= set(g.targets):
            raise app.UsageError(f"--grid_targets: the grid's targets are {list(g.targets)}")
        g = dataclasses.replace(g, targets=tuple(t for t in g.targets if t in want))
    if _VARIANTS.value:
        unknown = sorted(set(_VARIANTS.value) - set(g.variants))
        if unknown:
            raise app.UsageError(f"--grid_variants: {unknown} not in the grid's {list(g.variants)}")
        keep = {
            v: spec for v, spec in g.variants.items() if v in _VARIANTS.value or v == g.reference
        }
        g = dataclasses.replace(g, variants=keep)
    return g


def cells(g: Grid) -> list[Cell]:
    """Dense models first: every other cell of a (config, seed) starts from its checkpoint.
    Then the lowest target first, where the choice of channels matters most; the dense models
    trained as long as the pruned ones (the longest cells, needed only for the headline) last,
    so that a grid stopped early has its comparisons."""
    out = [Cell(c, DENSE, 1.0, s) for c in g.configs for s in g.seeds]
    for c in g.configs:
        for t in sorted(g.targets):
            out += [Cell(c, v, t, s) for v in g.variants for s in g.seeds]
    if not g.equal_budget:
        return out
    return out + [Cell(c, BUDGET, 1.0, s) for c in g.configs for s in g.seeds]


def not_run(g: Grid, done) -> list[str]:
    """What a report lacks, per config and target: `done` is the cells with results. The
    equal-budget dense models are named apart (the report already says "not run yet" where
    they are missing)."""
    missing: dict[tuple[str, float], dict[str, None]] = {}  # an ordered set of variants
    for c in cells(g):
        if c not in done and c.variant != BUDGET:
            missing.setdefault((c.config, c.target), {})[c.variant] = None
    return [
        f"not run yet: {config}"
        + ("" if list(variants) == [DENSE] else f" at {target}")
        + f" ({', '.join(variants)})"
        for (config, target), variants in missing.items()
    ]


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def settings() -> dict:
    out = {}
    for item in _SET.value:
        key, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _literal(value.strip())
    return out


def apply(config, overrides: dict):
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        node = config[section] if section else config
        if leaf not in node:
            raise app.UsageError(f"{key}: no such setting in the config")
        try:
            node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
        except (TypeError, ValueError) as e:
            raise app.UsageError(f"{key}={value!r}: {e}") from None
    return config


def check_settings(g: Grid) -> None:
    """Every config of the grid with its schedule and --set, checked as a run checks it."""
    from amap_jax import config as config_lib

    for name in g.configs:
        config_lib.validate(load_config(Cell(name, DENSE, 1.0, g.seeds[0]), g, settings()))


def load_config(cell: Cell, g: Grid, extra: dict):
    path = os.path.join(ROOT_DIR, CONFIGS[cell.config])
    spec = importlib.util.spec_from_file_location(f"compare_{cell.config}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = apply(module.get_config(), {**g.schedule, **extra})
    c.seed = cell.seed
    c.checkpoint_every = 100
    if cell.variant not in (DENSE, BUDGET):
        method, overrides = g.variants[cell.variant]
        c.method, c.search.target = method, cell.target
        apply(c, overrides)
    return c


# ----------------------------------------------------------------------------------------------
# One cell (in a worker process)


def run_cell(cell: Cell, root: str, g: Grid, extra: dict) -> dict:
    workdir = cell.workdir(root)
    record = os.path.join(workdir, "cell.json")
    if os.path.exists(record):
        return trees.read_json(record)
    if cell.variant == BUDGET and not g.equal_budget:
        raise ValueError("this grid's schedule is not the equal-budget dense models' schedule")
    config = load_config(cell, g, extra)
    t0 = time.time()
    if cell.variant == DENSE:
        ctx, arch = pipeline.make_context(config, workdir)
        os.makedirs(workdir, exist_ok=True)
        with workdir_lib.lock(workdir):  # one writer, as pipeline.run has it
            params = pipeline.train_dense(ctx, arch)
        model = ctx.build(arch)
        result = {
            "end": ctx.evaluate(model, {"params": params})["top1"],
            "val": {"end": ctx.val_top1(model, {"params": params})},
        }
    else:
        _copy_dense(cell, root, workdir, config)
        if cell.variant == BUDGET:
            result = _equal_budget(config, workdir)
        else:
            result = _pruned(config, workdir)
    epochs = {k: config[k].epochs for k in ("train", "search", "finetune")}
    result = {**dataclasses.asdict(cell), **result, "epochs": epochs}
    # Stage numbers are the test split's; result["val"] the validation split's (what tuning reads).
    result["splits"] = {k: config.data[f"{k}_split"] or None for k in ("train", "val", "test")}
    result["wall_s"] = round(time.time() - t0, 1)
    trees.write_json(record, result)
    return result


def _copy_dense(cell: Cell, root: str, workdir: str, config) -> None:
    """The seed's dense checkpoint as the cell's own finished dense stage."""
    if not os.path.exists(os.path.join(workdir, "dense")):
        os.makedirs(workdir, exist_ok=True)
        src = Cell(cell.config, DENSE, 1.0, cell.seed).workdir(root)
        shutil.copytree(os.path.join(src, "dense"), os.path.join(workdir, "dense"))
        workdir_lib.record(workdir, config, "dense")


def _pruned(config, workdir: str) -> dict:
    s = pipeline.run(config, workdir)
    curve = dict((round(e), t) for e, t in s["finetune_top1_by_epoch"])
    val = s.get("val", {})
    val_curve = dict((round(e), t) for e, t in val.get("finetune_top1_by_epoch", []))
    return {
        "after search": s["pruned_before_finetune_top1"],
        "after 1 fine-tune epoch": curve.get(1),
        "end": s["pruned"]["top1"],
        "val": {
            "after search": val.get("pruned_before_finetune_top1"),
            "after 1 fine-tune epoch": val_curve.get(1),
            "end": val.get("pruned_top1"),
        },
        "dense_top1": s["dense"]["top1"],
        "macs_ratio": s["macs_ratio"],
        "budget": s["budget"],
        "pruned_blocks": s["arch"]["pruned_blocks"],
        "kept_tokens_mean": s["pruned"].get("kept_tokens_mean"),
        "speedup_batch1": s.get("speedup_batch1"),
    }


def _equal_budget(config, workdir: str) -> dict:
    """The dense model trained for the cells' extra epochs with the fine-tuning recipe: as long
    as the search (in the search stage's directory) and then as the fine-tuning."""
    ctx, arch = pipeline.make_context(config, workdir)
    with workdir_lib.lock(workdir):  # one writer, as pipeline.run has it
        return _equal_budget_locked(ctx, arch, config)


def _equal_budget_locked(ctx, arch, config) -> dict:
    dense = pipeline.train_dense(ctx, arch)
    first = config.finetune.copy_and_resolve_references()
    first.epochs = config.search.epochs
    params = pipeline.finetune(ctx, arch, dense, arch, dense, stage=first, directory="search")
    model = ctx.build(arch)
    after = ctx.evaluate(model, {"params": params})["top1"]
    val_after = ctx.val_top1(model, {"params": params})
    params = pipeline.finetune(ctx, arch, params, arch, dense)
    curve = dict((round(e), t) for e, t in pipeline.finetune_curve(ctx.workdir))
    val_curve = dict((round(e), t) for e, t in pipeline.finetune_curve(ctx.workdir, key="val_top1"))
    end = ctx.evaluate(model, {"params": params})["top1"]
    return {
        "after search": after,
        "after 1 fine-tune epoch": curve.get(1),
        "end": end,
        "val": {
            "after search": val_after,
            "after 1 fine-tune epoch": val_curve.get(1),
            "end": ctx.val_top1(model, {"params": params}),
        },
        "macs_ratio": 1.0,
    }


# ----------------------------------------------------------------------------------------------
# Many cells: parallel workers, one per core, resumable


def _pending(todo: list[Cell], done: set, running: set) -> Cell | None:
    for c in todo:
        if c in done or c in running:
            continue
        dense = Cell(c.config, DENSE, 1.0, c.seed)
        if c.variant != DENSE and dense not in done:
            continue
        return c
    return None


def run_all(g: Grid, root: str, jobs: int) -> list[dict]:
    """Every cell of the grid, `jobs` at a time, each worker pinned to its own core."""
    todo = cells(g)
    results = {}
    for c in todo:
        record = os.path.join(c.workdir(root), "cell.json")
        if os.path.exists(record):
            results[c] = trees.read_json(record)
    cores = sorted(os.sched_getaffinity(0))
    jobs = min(jobs or len(cores), len(cores))
    free, running = list(cores[:jobs]), {}
    t0, walls = time.time(), {}
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(root, ".jax_cache")}
    extra = json.dumps(settings())
    while len(results) < len(todo):
        nxt = _pending(todo, set(results), set(running))
        while nxt is not None and free:
            core = free.pop(0)
            spec = json.dumps(
                {**dataclasses.asdict(nxt), "root": root, "grid": _grid_name(), "set": extra}
            )
            log = open(os.path.join(root, f"{nxt.config}_{nxt.name}.log"), "a")
            cmd = [
                "taskset",
                "-c",
                str(core),
                sys.executable,
                "-m",
                "bench.compare",
                f"--cell={spec}",
            ]
            running[nxt] = (
                subprocess.Popen(cmd, cwd=ROOT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT),
                core,
                time.time(),
                log,
            )
            nxt = _pending(todo, set(results), set(running))
        if not running:
            raise RuntimeError("cells wait for a dense model that failed; see the logs in ROOT")
        time.sleep(2)
        for c, (proc, core, started, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[c]
            free.append(core)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"cell {c.config}/{c.name} failed (exit {proc.returncode}); see "
                    f"{os.path.join(root, f'{c.config}_{c.name}.log')}"
                )
            results[c] = trees.read_json(os.path.join(c.workdir(root), "cell.json"))
            kind = "dense" if c.variant == DENSE else "cell"
            walls.setdefault(kind, []).append(time.time() - started)
            left = [x for x in todo if x not in results]
            eta, guess = _eta(left, walls, jobs)
            print(
                f"[{len(results)}/{len(todo)}] {c.config} {c.variant} t={c.target} "
                f"s={c.seed}: {time.time() - started:.0f} s; {(time.time() - t0) / 60:.0f} min "
                f"so far, about {eta / 60:.0f} min left"
                + (" (a guess until a cell of each kind has finished)" if guess else ""),
                flush=True,
            )
    return [results[c] for c in todo]


def _eta(left: list[Cell], walls: dict, jobs: int) -> tuple[float, bool]:
    """Seconds left, each cell at the mean wall time of its kind (dense model or cell) so far,
    and whether that was a guess: a kind not timed yet costs what the other kind did."""
    mean = {k: float(np.mean(v)) for k, v in walls.items()}  # called once a cell has finished
    kinds = ["dense" if c.variant == DENSE else "cell" for c in left]
    fallback = float(np.mean(list(mean.values())))
    seconds = sum(mean.get(k, fallback) for k in kinds) / max(jobs, 1)
    return seconds, any(k not in mean for k in kinds)


def _grid_name() -> str:
    return "quick" if _QUICK.value else _GRID.value


# ----------------------------------------------------------------------------------------------
# The report: paired intervals and verdicts


def by_seed(results, config, variant, target, stage) -> dict:
    out = {}
    for r in results:
        if r["config"] == config and r["variant"] == variant and r.get(stage) is not None:
            if variant in (DENSE, BUDGET) or r["target"] == target:
                out[r["seed"]] = float(r[stage])
    return out


def on_split(cell: dict, split: str) -> dict:
    """The cell with its stage numbers read from `split` ("test": as recorded; "val": from
    its validation numbers, None where the cell has none)."""
    if split == "test":
        return cell
    val = cell.get("val") or {}
    return {**cell, **{stage: val.get(stage) for stage in STAGES}, "split": split}


def summarize(results: list[dict], g: Grid) -> list[dict]:
    """Per config, target and variant: top-1 at every stage (mean and 95% interval), the
    achieved MACs ratio, and the paired differences to the reference method and to the
    equal-budget dense model, each with its interval and verdict."""
    rows = []
    for config in g.configs:
        for target in g.targets:
            for variant in g.variants:
                cell = [
                    r
                    for r in results
                    if r["config"] == config and r["variant"] == variant and r["target"] == target
                ]
                if not cell:
                    continue
                achieved = [r["budget"]["achieved"] for r in cell]
                ends = [r["budget"].get("search_end") for r in cell]
                row = {
                    "config": config,
                    "target": target,
                    "variant": variant,
                    "seeds": sorted(r["seed"] for r in cell),
                    "achieved_macs": stats.interval(achieved),
                    "search_end": stats.interval([e for e in ends if e is not None]),
                    "fixup": max((r["budget"].get("fixup") or 0.0) for r in cell),
                }
                for stage in STAGES:
                    mine = by_seed(results, config, variant, target, stage)
                    ref = by_seed(results, config, g.reference, target, stage)
                    dense = by_seed(results, config, BUDGET, target, stage)
                    row[stage] = {
                        "top1": stats.interval(list(mine.values())),
                        "vs_" + g.reference: stats.paired(mine, ref),
                        "vs_dense": stats.paired(mine, dense),
                    }
                rows.append(row)
    return rows


MATCHED = 0.005  # a row is at the reference's budget when its achieved MACs are this close


def budget_gaps(rows: list[dict], ref: str) -> dict:
    """(config, target, variant) -> achieved MACs minus the reference's, where the two differ
    by more than MATCHED: those rows are not at the same budget, and say so."""
    refs = {
        (r["config"], r["target"]): r["achieved_macs"]["mean"] for r in rows if r["variant"] == ref
    }
    out = {}
    for r in rows:
        key = (r["config"], r["target"])
        if r["variant"] != ref and key in refs:
            gap = r["achieved_macs"]["mean"] - refs[key]
            if abs(gap) > MATCHED:
                out[(*key, r["variant"])] = gap
    return out


def verdict_lines(rows: list[dict], results: list[dict], g: Grid) -> list[str]:
    """Where the reference (AMAP) beats each method with an interval that excludes 0, and the
    targets the comparison was asked to show."""
    ref = g.reference
    out = [
        f"not at {ref}'s budget: {config}, MACs {target}, {variant} achieves {gap:+.3f} of the "
        f"dense MACs against {ref} (more than {MATCHED}): its differences mix method and budget"
        for (config, target, variant), gap in budget_gaps(rows, ref).items()
    ]
    for row in rows:
        if row["variant"] == ref:
            continue
        for stage in STAGES:
            d = row[stage]["vs_" + ref]
            if d["n"] < 2:
                continue
            # d is variant - reference: reference better when the variant is worse.
            word = {"worse": f"{ref} better", "better": f"{ref} worse"}.get(
                d["verdict"], d["verdict"]
            )
            out.append(
                f"{row['config']}, MACs {row['target']}, {stage}: {row['variant']} - {ref} "
                f"{stats.fmt(d)}: {word}"
            )
    for row in rows:
        if row["variant"] == ref and row["target"] == 0.7:
            d = row["end"]["vs_dense"]
            out.append(
                f"target: {row['config']}, {ref} at 0.7 within 0.3 points of the equal-budget "
                f"dense model: {stats.fmt(d)}: {stats.within(d, 0.3)}"
            )
        if row["variant"] == "random" and row["target"] == 0.3:
            d = row["after 1 fine-tune epoch"]["vs_" + ref]
            shown = "met" if d["n"] > 1 and d["hi"] < 0 else "not met"
            out.append(
                f"target: {row['config']}, {ref} above random at 0.3 after 1 fine-tune epoch: "
                f"random - {ref} {stats.fmt(d)}: {shown}"
            )
    return out


def markdown(rows, results, g: Grid, notes: list[str], wall: float, name: str = "") -> str:
    ref = g.reference
    epochs = next((r["epochs"] for r in results if r["variant"] not in (DENSE, BUDGET)), {})
    lines = [
        f"# bench.compare --grid {name}",
        "",
        f"Fashion-MNIST; {len(g.seeds)} seeds ({', '.join(map(str, g.seeds))}), methods paired "
        f"by seed; dense model {epochs.get('train')} epochs, then a cell: search "
        f"{epochs.get('search')} epoch, fine-tune {epochs.get('finetune')} epochs. Top-1 in % on "
        f"the {'validation' if g.split == 'val' else 'test'} split, "
        f"mean [95% interval]; differences are paired (method - {ref}, method - equal-budget "
        "dense), with a verdict only where the interval excludes 0. Wall time of the cells: "
        f"{wall / 3600:.1f} core-hours.",
        "",
    ]
    for config in g.configs:
        dense = by_seed(results, config, DENSE, 1.0, "end")
        budget = by_seed(results, config, BUDGET, 1.0, "end")
        extra = epochs.get("search", 0) + epochs.get("finetune", 0)
        lines += [
            f"## {config}",
            "",
            f"Dense model ({epochs.get('train')} epochs): "
            f"{stats.fmt(stats.interval(list(dense.values()))).replace('+', '')}; "
            f"equal-budget dense (+{extra} epochs): "
            + (
                stats.fmt(stats.interval(list(budget.values()))).replace("+", "")
                if budget
                else "not run yet"
            ),
            "",
            f"| MACs target | method | search end | fix-up (max) | achieved MACs | after search "
            f"| - {ref} | after 1 fine-tune epoch | - {ref} | end | - {ref} | "
            "- dense, equal budget |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        gaps = budget_gaps(rows, ref)
        for row in (r for r in rows if r["config"] == config):
            end = row.get("search_end", {"n": 0})
            gap = gaps.get((config, row["target"], row["variant"]))
            cells_ = [
                f"{row['target']}",
                row["variant"],
                f"{end['mean']:.3f}" if end["n"] else "-",
                f"{row['fixup']:.3f}",
                f"{row['achieved_macs']['mean']:.3f}"
                + ("" if gap is None else f" ({gap:+.3f}: not matched)"),
            ]
            for stage in STAGES:
                top = row[stage]["top1"]
                cells_.append(f"{top['mean']:.2f}" if top["n"] else "")
                d = row[stage]["vs_" + ref]
                cells_.append("" if row["variant"] == ref else _short(d))
            cells_.append(_short(row["end"]["vs_dense"]))
            lines.append("| " + " | ".join(cells_) + " |")
        lines.append("")
    lines += ["## Verdicts", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _short(d: dict) -> str:
    if d["n"] < 2:
        return ""
    mark = {"better": " (+)", "worse": " (-)"}.get(d["verdict"], "")
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]{mark}"


def plots(rows, results, g: Grid, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(
        len(g.configs),
        len(STAGES),
        figsize=(5.2 * len(STAGES), 4.4 * len(g.configs)),
        squeeze=False,
        sharey="row",
    )
    for ax_row, config in zip(axes, g.configs, strict=True):
        for ax, stage in zip(ax_row, STAGES, strict=True):
            for k, variant in enumerate(g.variants):
                pts = [r for r in rows if r["config"] == config and r["variant"] == variant]
                if not pts:
                    continue
                x = [r["achieved_macs"]["mean"] for r in pts]  # as achieved: no offsets
                y = [r[stage]["top1"]["mean"] for r in pts]
                err = [
                    [r[stage]["top1"]["mean"] - r[stage]["top1"]["lo"] for r in pts],
                    [r[stage]["top1"]["hi"] - r[stage]["top1"]["mean"] for r in pts],
                ]
                marker = "osD^vP*X"[k % 8]
                ax.errorbar(
                    x, y, yerr=err, marker=marker, ms=5, capsize=3, color=f"C{k}", label=variant
                )
            budget = stats.interval(list(by_seed(results, config, BUDGET, 1.0, stage).values()))
            if budget["n"]:
                ax.axhline(budget["mean"], color="k", lw=1, label=BUDGET)
                if budget["n"] > 1:
                    ax.axhspan(budget["lo"], budget["hi"], color="k", alpha=0.08)
            ax.set_title(f"{config}: {stage}")
            ax.set_xlabel("achieved MACs ratio (pruned / dense)")
            # every config on the grid's MACs range, whatever part of it has run
            ax.set_xlim(min(g.targets) - 0.05, max(g.targets) + 0.05)
            ax.grid(alpha=0.3)
        ax_row[0].set_ylabel(f"{g.split} top-1 %, mean and 95% interval")
    _figure_legend(fig, axes)
    paths.append(os.path.join(common.out_dir(), f"compare_{name}_top1.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    paths.append(_diff_plot(rows, g, name, plt))
    if "tokens" in g.configs:
        return paths
    target = min(g.targets)
    fig, axes = plt.subplots(len(g.configs), 3, figsize=(13, 3.4 * len(g.configs)), squeeze=False)
    for ax_row, config in zip(axes, g.configs, strict=True):
        sites = (("q/k per head", 2), ("v per head", 3), ("MLP units", 4))
        for ax, (site, col) in zip(ax_row, sites, strict=True):
            variants = [
                v
                for v in g.variants
                if any(
                    r["config"] == config and r["variant"] == v and r["target"] == target
                    for r in results
                )
            ]
            width = 0.8 / max(len(variants), 1)
            for k, variant in enumerate(variants):
                blocks = [
                    r["pruned_blocks"]
                    for r in results
                    if r["config"] == config and r["variant"] == variant and r["target"] == target
                ]
                kept = np.mean([[b[col] for b in bl] for bl in blocks], axis=0)
                x = np.arange(len(kept)) + (k - (len(variants) - 1) / 2) * width
                ax.bar(x, kept, width, color=f"C{list(g.variants).index(variant)}", label=variant)
            ax.set_title(f"{config}, MACs {target}: {site}", fontsize=10)
            ax.set_xlabel("block")
            ax.set_xticks(range(len(kept)))
    fig.suptitle("channels kept per block, mean over seeds", fontsize=11)
    _figure_legend(fig, axes)  # under the panels: in one it covered the bars
    paths.append(os.path.join(common.out_dir(), f"compare_{name}_widths.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _figure_legend(fig, axes):
    """One legend under the panels, with room for as many rows as it takes."""
    handles, labels = _legend(axes)
    ncol = min(len(labels), 6)
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9)
    fig.tight_layout(rect=(0, (0.3 + 0.25 * rows) / fig.get_figheight(), 1, 1))


def _legend(axes):
    """Every label drawn in any panel, once (a panel may lack a method that others have)."""
    seen = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    return list(seen.values()), list(seen)


def _diff_plot(rows, g: Grid, name: str, plt) -> str:
    """Each method minus the reference on the same seeds, with the 95% interval: what the
    verdicts read."""
    ref = g.reference
    others = [v for v in g.variants if v != ref]
    fig, axes = plt.subplots(
        len(g.configs),
        len(STAGES),
        figsize=(5.2 * len(STAGES), 4.0 * len(g.configs)),
        squeeze=False,
        sharey="row",
    )
    for ax_row, config in zip(axes, g.configs, strict=True):
        for ax, stage in zip(ax_row, STAGES, strict=True):
            for k, variant in enumerate(others):
                pts = [
                    r
                    for r in rows
                    if r["config"] == config
                    and r["variant"] == variant
                    and r[stage]["vs_" + ref]["n"] > 1
                ]
                if not pts:
                    continue
                d = [r[stage]["vs_" + ref] for r in pts]
                # each target at its own tick, the methods side by side around it
                shift = (k - (len(others) - 1) / 2) * 0.8 / max(len(others), 1)
                x = [g.targets.index(r["target"]) + shift for r in pts]
                y = [v["mean"] for v in d]
                err = [[v["mean"] - v["lo"] for v in d], [v["hi"] - v["mean"] for v in d]]
                ax.errorbar(
                    x,
                    y,
                    yerr=err,
                    fmt="o",
                    ms=4,
                    capsize=3,
                    color=f"C{list(g.variants).index(variant)}",
                    label=variant,
                )
            ax.axhline(0, color="k", lw=1)
            ax.set_xticks(range(len(g.targets)), [f"MACs {t}" for t in g.targets])
            ax.set_title(f"{config}: {stage}")
            ax.grid(alpha=0.3)
        ax_row[0].set_ylabel(f"top-1 minus {ref}'s, same seed (points)")
    _figure_legend(fig, axes)
    slug = re.sub(r"[^\w.-]+", "_", ref)  # "amap+asvit", "search only: shift"
    path = os.path.join(common.out_dir(), f"compare_{name}_vs_{slug}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    logs.setup()
    if _CELL.value:  # a worker
        spec = json.loads(_CELL.value)
        g = GRIDS[spec.pop("grid")]
        root, extra = spec.pop("root"), json.loads(spec.pop("set"))
        run_cell(Cell(**spec), root, g, extra)
        return
    g = grid()
    root = os.path.abspath(_ROOT.value + ("_quick" if g is GRIDS["quick"] else ""))
    if not _REPORT_ONLY.value:
        check_settings(g)  # a bad --set is one line now, not a failure in every cell
        os.makedirs(root, exist_ok=True)
    if _REPORT_ONLY.value:
        results = [
            trees.read_json(os.path.join(c.workdir(root), "cell.json"))
            for c in cells(g)
            if os.path.exists(os.path.join(c.workdir(root), "cell.json"))
        ]
    else:
        print(f"grid {_grid_name()}: {len(cells(g))} cells ({g.cost})", flush=True)
        results = run_all(g, root, _JOBS.value)
    if not results:
        raise app.UsageError(f"no finished cells of grid {_grid_name()} under {root}")
    results = [on_split(r, g.split) for r in results]
    rows = summarize(results, g)
    notes = verdict_lines(rows, results, g)
    notes += not_run(g, {Cell(r["config"], r["variant"], r["target"], r["seed"]) for r in results})
    if _SET.value:
        notes.insert(0, f"every run with {', '.join(_SET.value)}")
    full = GRIDS[_grid_name()]
    if (g.configs, g.targets, g.seeds) != (full.configs, full.targets, full.seeds):
        notes.insert(
            0,
            f"part of the grid: configs {list(g.configs)}, targets {list(g.targets)}, "
            f"seeds {list(g.seeds)} (of {list(full.configs)}, {list(full.targets)}, "
            f"{list(full.seeds)})",
        )
    wall = sum(r["wall_s"] for r in results)
    name = _grid_name()
    md = markdown(rows, results, g, notes, wall, name)
    common.write(
        f"compare_{name}",
        rows,
        {
            "cells": results,
            "verdicts": notes,
            "grid": name,
            "set": settings(),
            "core_hours": wall / 3600,
        },
        md,
    )
    pngs = plots(rows, results, g, name)
    print(md)
    print(
        "wrote "
        + ", ".join(
            [f"compare_{name}.json", f"compare_{name}.md"] + [os.path.basename(p) for p in pngs]
        )
    )


if __name__ == "__main__":
    common.run(main)
