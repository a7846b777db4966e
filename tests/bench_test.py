"""The benchmarks' reports: bench/compare.py's paired statistics and verdicts on fixed
numbers, and each bench's table from fixed measurements."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fake_latency

from bench import compare


def _result(config, variant, target, seed, top1, achieved=None):
    """A finished cell as bench.compare records it: top-1 after the search, after one
    fine-tuning epoch (0.5 more) and at the end (1.0 more)."""
    out = {
        "config": config,
        "variant": variant,
        "target": target,
        "seed": seed,
        "after search": top1,
        "after 1 fine-tune epoch": top1 + 0.5,
        "end": top1 + 1.0,
        "wall_s": 60.0,
        "epochs": {"train": 8.0, "search": 0.5, "finetune": 2.0},
    }
    if variant not in (compare.DENSE, compare.BUDGET):
        out["budget"] = {"achieved": achieved or target - 0.002, "fixup": 0.0}
        if variant == "amap":
            out["budget"]["search_end"] = target - 0.001
        out["pruned_blocks"] = [["S", 4, 12, 12, 100, 64, 64]] * 4
    return out


GRID = compare.Grid(("vit",), (0.7, 0.3), {m: (m, {}) for m in ("amap", "random", "vtp")})


def _results():
    """AMAP 0.4-0.6 above random seed by seed (the seeds themselves spread by 2 points), VTP
    indistinguishable from AMAP, AMAP at 0.7 0.1 below the equal-budget dense model."""
    base = {0: 85.0, 1: 86.0, 2: 84.5, 3: 85.5, 4: 86.5}
    noise = {0: 0.3, 1: -0.4, 2: 0.2, 3: -0.1, 4: 0.05}
    gap = {0: 0.4, 1: 0.5, 2: 0.6, 3: 0.5, 4: 0.4}
    out = []
    for s, b in base.items():
        out.append(_result("vit", compare.DENSE, 1.0, s, b + 2))
        out.append(_result("vit", compare.BUDGET, 1.0, s, b + 0.1 + noise[s] / 10))
        for t in GRID.targets:
            out.append(_result("vit", "amap", t, s, b))
            out.append(_result("vit", "random", t, s, b - gap[s]))
            out.append(_result("vit", "vtp", t, s, b + noise[s]))
    return out


def test_grid_cells_start_with_the_dense_models_and_pair_by_seed():
    cells = compare.cells(GRID)
    dense = [c for c in cells if c.variant == compare.DENSE]
    assert cells[: len(dense)] == dense and len(dense) == 5  # one per seed, first
    assert len(cells) == 5 + 5 + 2 * 3 * 5  # dense, equal budget, targets x methods x seeds
    names = {c.workdir("/r") for c in cells}
    assert len(names) == len(cells) and "/r/vit/amap_t0.3_s4" in names
    # a cell waits for its seed's dense model only
    first = compare._pending(cells, set(), set())
    assert first.variant == compare.DENSE and first.seed == 0
    later = compare._pending(cells, {dense[1]}, set(dense))
    assert later.seed == 1 and later.variant == "amap" and later.target == 0.3  # lowest first
    assert {c.variant for c in cells[-5:]} == {compare.BUDGET}  # the longest cells last


def test_part_of_a_grid_is_the_same_cells_and_bad_parts_are_refused():
    from absl import app, flags
    from absl.testing import flagsaver

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # the defaults, as a run without flags has them
    full = compare.cells(compare.GRIDS["channels"])
    with flagsaver.flagsaver(grid_configs=["vit"], grid_targets=["0.3", "0.7"]):
        part = compare.cells(compare.grid())
    assert set(part) < set(full)
    assert {
        (c.config, c.target) for c in part if c.variant not in (compare.DENSE, compare.BUDGET)
    } == {
        ("vit", 0.3),
        ("vit", 0.7),
    }
    with flagsaver.flagsaver(grid="extras", grid_variants=["vtp: l1 1e-3"]):
        part = compare.cells(compare.grid())  # the reference (amap) stays: cells pair with it
    assert {c.variant for c in part} == {compare.DENSE, compare.BUDGET, "amap", "vtp: l1 1e-3"}
    with flagsaver.flagsaver(grid_variants=["vtp: l1 2"]), pytest.raises(app.UsageError):
        compare.grid()
    with flagsaver.flagsaver(grid_targets=["0.4"]), pytest.raises(app.UsageError, match="targets"):
        compare.grid()
    with flagsaver.flagsaver(grid_configs=["swin"]), pytest.raises(app.UsageError, match="swin"):
        compare.grid()


def test_a_report_names_the_cells_it_lacks():
    cells = compare.cells(GRID)
    assert compare.not_run(GRID, set(cells)) == []
    done = {c for c in cells if not (c.target == 0.3 and c.variant != "amap")}
    assert compare.not_run(GRID, done) == ["not run yet: vit at 0.3 (random, vtp)"]
    # a missing equal-budget model is not listed (its column says "not run yet")
    assert compare.not_run(GRID, {c for c in cells if c.variant != compare.BUDGET}) == []
    dense = {c for c in cells if c.variant == compare.DENSE}
    assert compare.not_run(GRID, set(cells) - dense)[0] == "not run yet: vit (dense)"


def test_remaining_time_counts_each_kind_and_says_when_it_guesses():
    dense = compare.Cell("tokens", compare.DENSE, 1.0, 2)
    cell = compare.Cell("tokens", "asvit", 0.5, 2)
    # only dense models timed: the cells left cost what a dense model did, and it is a guess
    assert compare._eta([dense, cell, cell], {"dense": [1200.0, 1300.0]}, 2) == (1875.0, True)
    walls = {"dense": [1200.0], "cell": [500.0, 700.0]}
    assert compare._eta([dense, cell, cell], walls, 2) == (1200.0, False)
    assert compare._eta([], walls, 2) == (0.0, False)


def test_summary_pairs_methods_by_seed_with_intervals():
    rows = compare.summarize(_results(), GRID)
    random = next(r for r in rows if r["variant"] == "random" and r["target"] == 0.3)
    d = random["after 1 fine-tune epoch"]["vs_amap"]
    assert d["mean"] == pytest.approx(-0.48) and d["hi"] < 0 and d["verdict"] == "worse"
    vtp = next(r for r in rows if r["variant"] == "vtp" and r["target"] == 0.3)
    assert vtp["end"]["vs_amap"]["verdict"] == "no difference detected at n=5"
    amap = next(r for r in rows if r["variant"] == "amap" and r["target"] == 0.7)
    assert amap["achieved_macs"]["mean"] == pytest.approx(0.698)
    assert amap["end"]["vs_dense"]["mean"] == pytest.approx(-0.1 - 0.01, abs=0.02)
    notes = compare.verdict_lines(rows, _results(), GRID)
    assert "vit, MACs 0.3, after 1 fine-tune epoch: random - amap -0.48 [" in "\n".join(notes)
    assert any(n.endswith("amap better") for n in notes if "random - amap" in n)
    assert any(
        n.startswith("target: vit, amap above random at 0.3 after 1 fine-tune epoch")
        and n.endswith(": met")
        for n in notes
    )
    within = [n for n in notes if "within 0.3 points" in n]
    assert len(within) == 1 and within[0].endswith(": shown")
    table = compare.markdown(rows, _results(), GRID, notes, 3600.0)
    assert "| 0.3 | random | - | 0.000 | 0.298 |" in table and "(-)" in table
    assert "equal-budget dense (+2.5 epochs)" in table and "| 0.3 | amap | 0.299 |" in table


def test_a_validation_grid_reads_each_cells_validation_numbers():
    results = _results()
    for r in results:
        r["val"] = {stage: r[stage] - 2.0 for stage in compare.STAGES}
    val = [compare.on_split(r, "val") for r in results]
    assert [v["end"] for v in val] == [r["end"] - 2.0 for r in results]
    assert compare.on_split(results[0], "test") is results[0]
    grid = compare.Grid(GRID.configs, GRID.targets, GRID.variants, split="val")
    rows = compare.summarize(val, grid)
    amap = next(r for r in rows if r["variant"] == "amap" and r["target"] == 0.3)
    assert amap["end"]["top1"]["mean"] == pytest.approx(85.5 + 1.0 - 2.0)
    table = compare.markdown(rows, val, grid, [], 60.0)
    assert "on the validation split" in table
    # a cell recorded without validation numbers has none to give
    assert compare.on_split({**results[0], "val": None}, "val")["end"] is None
    # the search-only grid that chooses amap.linear_qk has no equal-budget dense models: they
    # share their work directories with the channel grid's, at another schedule
    kinds = {c.variant for c in compare.cells(compare.GRIDS["linear_qk"])}
    assert compare.BUDGET not in kinds and compare.DENSE in kinds
    assert compare.BUDGET in {c.variant for c in compare.cells(compare.GRIDS["channels"])}


def test_a_bench_prints_no_library_info_lines(tmp_path):
    """bench.common quiets the libraries for every bench: no TPU-backend or orbax INFO lines."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from absl import app; import bench.common, jax; "
            "app.run(lambda _: len(jax.devices()) and None)",
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr[-2000:]


def test_a_row_not_at_the_references_budget_says_so():
    results = [
        {**r, "budget": {**r["budget"], "achieved": 0.280}}
        if r["variant"] == "random" and r["target"] == 0.3
        else r
        for r in _results()
    ]
    rows = compare.summarize(results, GRID)
    assert compare.budget_gaps(rows, "amap") == {("vit", 0.3, "random"): pytest.approx(-0.018)}
    notes = compare.verdict_lines(rows, results, GRID)
    assert notes[0].startswith("not at amap's budget: vit, MACs 0.3, random achieves -0.018")
    table = compare.markdown(rows, results, GRID, notes, 60.0)
    assert "| 0.3 | random | - | 0.000 | 0.280 (-0.018: not matched) |" in table
    assert compare.budget_gaps(compare.summarize(_results(), GRID), "amap") == {}


def test_a_bench_writes_its_results_where_its_flags_say(tmp_path):
    """Into --results_dir (default workdirs/bench); into bench/results/, which the docs cite,
    only with --update_results."""
    from absl import flags
    from absl.testing import flagsaver

    from bench import common

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    assert flags.FLAGS["results_dir"].default == "workdirs/bench"
    with flagsaver.flagsaver(results_dir=str(tmp_path / "mine")):
        assert common.out_dir() == str(tmp_path / "mine")
        path = common.write("probe", [{"x": 1}], {"k": "v"}, "# probe\n")
        assert path == str(tmp_path / "mine" / "probe.json")
        assert os.path.exists(tmp_path / "mine" / "probe.md")
    with flagsaver.flagsaver(results_dir=str(tmp_path / "mine"), update_results=True):
        assert common.out_dir() == common.RESULTS


def test_plots_draw_every_stage_and_the_widths(tmp_path, monkeypatch):
    from bench import common

    monkeypatch.setattr(common, "out_dir", lambda: str(tmp_path))
    rows = compare.summarize(_results(), GRID)
    paths = compare.plots(rows, _results(), GRID, "test")
    assert [os.path.basename(p) for p in paths] == [
        "compare_test_top1.png",
        "compare_test_vs_amap.png",
        "compare_test_widths.png",
    ]
    assert all(os.path.getsize(p) > 10_000 for p in paths)


def test_vs_timm_summary_takes_medians_and_ranges_over_alternations():
    from bench import vs_timm

    def run(dense, pruned, padded=None):
        speeds = {"dense": dense, "45:1099": pruned}
        if padded:
            speeds["45:1099 padded"] = padded
        pads = {"multiple": [[8, 1]] * 12, "gains": {"x8": 1.02, "per layer": 1.05}}
        return {"images_per_s": speeds, "pad_multiple": {"45:1099": pads}}

    runs = {
        "jax": [
            run([10, 10, 10], [13, 13, 13], [14, 14, 14]),
            run([8, 8, 8], [12, 12, 12], [12, 12, 12]),
        ],
        "torch": [run([10, 10, 10], [12, 12, 12]), run([10, 10, 10], [11, 11, 11])],
    }
    (row,) = vs_timm.summarize(runs, {"45:1099": 1.5})
    assert row["ours_dense_img_s"] == 9.0 and row["ours_pruned_img_s"] == 12.5
    assert row["ours_speedup"] == 1.4  # the median of the rounds' 13/10 and 12/8
    assert row["ours_speedup_range"] == [1.3, 1.5]  # one per alternation
    assert row["ours_efficiency"] == round(1.4 / 1.5, 3)
    assert row["tp_speedup_range"] == [1.1, 1.2]
    assert row["ours_padded_img_s"] == 13.0 and row["pad_multiple"] == [[8, 1]] * 12
    assert row["ours_over_tp_pruned"] == round(13.0 / 11.5, 3)  # the faster of ours
    assert "13.0 (attention x8, MLP x1)" in vs_timm.markdown(
        [row],
        {
            "model": "ViT-S/16",
            "image_size": 224,
            "batch": 32,
            "dtype": "float32",
            "alternations": 2,
            "rounds": 3,
            "device": "cpu",
            "cpus": 2,
        },
    )


def test_vs_timm_names_the_padding_it_timed():
    from bench.vs_timm import pad_label

    assert pad_label(8) == "x8"
    assert pad_label([[8, 1], [8, 1]]) == "attention x8, MLP x1"
    assert pad_label([[8, 1], [16, 1]]) == "per layer"


def test_dense_profile_reports_ms_per_part_and_shares_of_the_block():
    from bench.studies import dense_profile

    def run(ips):  # images/s of every part, two rounds
        return {"images_per_s": {p: [ips.get(p, 100.0)] * 2 for p in dense_profile.PARTS}}

    runs = {
        "jax": [run({"block": 10.0, "GELU": 40.0})],
        "torch": [run({"block": 20.0, "GELU": 40.0})],
    }
    rows = {r["part"]: r for r in dense_profile.summarize(runs, batch=8)}
    assert rows["block"]["ours_ms"] == 800.0 and rows["block"]["timm_ms"] == 400.0
    assert rows["block"]["ours_over_timm_time"] == 2.0
    assert (
        rows["GELU"]["ours_share_of_block"] == 0.25 and rows["GELU"]["timm_share_of_block"] == 0.5
    )
    assert "ours_share_of_block" not in rows["model"]
    md = dense_profile.markdown(
        list(rows.values()),
        {
            "model": "ViT-S/16",
            "batch": 8,
            "tokens": 197,
            "alternations": 1,
            "rounds": 2,
            "device": "cpu",
            "cpus": 2,
            "fused_attn": True,
        },
    )
    assert "| GELU | 200.00 | 200.00 | 1.00 | 0.25 / 0.50 |" in md


def test_search_multiple_rows_count_pads_in_macs_and_take_the_ideal_from_the_search():
    from amap_jax.models.arch import vit_arch
    from amap_jax.pruning import macs
    from bench import common
    from bench.studies import search_multiple

    dense = vit_arch("mini", image_size=28, patch_size=7, in_chans=1, num_classes=10)
    free = common.at_widths(dense, 13, 101)
    padded = common.at_widths(dense, 16, 104)  # the widths `padding.pad(free, ., 8)` gives
    dense_macs = macs.model_macs(dense)
    row = search_multiple.row(
        "vit",
        0.5,
        "free, padded x8",
        padded,
        searched=free,
        top1=[88.0, 88.2],
        speedups=[1.5, 1.2, 1.4],
        dense_macs=dense_macs,
    )
    assert row["macs_ratio"] == round(macs.model_macs(padded) / dense_macs, 3)
    assert row["ideal_speedup"] == round(dense_macs / macs.model_macs(free), 3)
    assert row["macs_ratio"] > round(1 / row["ideal_speedup"], 3)  # the pads cost MACs
    assert (row["top1_mean"], row["top1_sd"], row["seeds"]) == (88.1, 0.14, 2)
    assert (row["speedup"], row["speedup_range"]) == (1.4, [1.2, 1.5])
    md = search_multiple.markdown([row])
    assert "| vit | 0.5 | free, padded x8 | 88.10 ± 0.14 |" in md and "1.40x (1.20-1.50)" in md


def test_benches_import_together_and_keep_their_own_timing_defaults():
    from absl import flags

    from bench import (  # noqa: F401  every bench in one process: no flag defined twice
        batch1,
        common,
        latency_model,
        throughput,
        token_speed,
        vs_timm,
    )
    from bench.studies import (  # noqa: F401
        attention_core,
        dense_profile,
        dtype,
        padding,
        search_multiple,
        search_step,
        xla_flags,
    )

    before = flags.FLAGS["batch"].default
    try:
        common.defaults(batch=256, seconds=1.0)
        got = tuple(
            flags.FLAGS[h.name].value for h in (common.BATCH, common.ROUNDS, common.SECONDS)
        )
        assert got == (256, 5, 1.0)
    finally:
        common.defaults(batch=before, seconds=4.0)


def test_padding_bench_judges_the_per_layer_choice_against_the_best_single_multiple():
    from bench.studies import padding as padding_bench

    ips = {"x1": [100.0, 90.0], "x8": [120.0, 99.0], "x16": [80.0, 80.0], "per layer": [110, 108]}
    model_macs = {"x1": 1000, "x8": 1100, "x16": 1200, "per layer": 1050}
    row = padding_bench.summarize(ips, model_macs, [(8, 1), (1, 16)])
    assert row["best_single"] == "x8"  # by its median over rounds, 109.5
    assert row["per_layer_over_best_single"] == round((110 / 120 + 108 / 99) / 2, 3)
    assert row["per_layer_over_unpadded"] == 1.15 and row["best_single_over_unpadded"] == 1.15
    assert row["per layer MACs"] == 1050 and row["per_layer_multiples"] == [[8, 1], [1, 16]]
    row = {"model": "m", "calibration_s": 3.0, **row}
    assert (
        "| m | x1 95.0, x8 110, x16 80.0 | x8 | 109 (8/1 1/16) | 1.15x |"
        in padding_bench.markdown([row])
    )


def test_attention_core_bench_times_the_models_core_against_the_per_key_softmax():
    from bench.studies import attention_core

    rows = attention_core.measure(8, 2, seconds=0.01, rounds=1)
    assert [(r["width"], r["pass"]) for r in rows] == [(8, "forward"), (8, "gradient")]
    for r in rows:  # the model's core is the softmax, forward and backward
        assert r["max_abs_diff"] < 1e-5 and r["ours_ms"] > 0 and r["per_key_ms"] > 0
    assert "| 8 | gradient |" in attention_core.markdown(
        rows, {"batch": 2, "rounds": 1, "device": "cpu", "cpus": 2}
    )


def test_throughput_bench_times_dense_and_exports_in_the_same_rounds():
    from amap_jax.models.arch import vit_arch
    from bench import throughput

    arch = vit_arch("mini", image_size=28, patch_size=7, in_chans=1, num_classes=10)
    rows = throughput.measure(arch, [0.7, 0.5], batch=2, seconds=0.01, rounds=2, kernels="default")
    assert [r["target"] for r in rows] == [0.7, 0.5]
    for r in rows:
        lo, hi = r["speedup_range"]
        assert lo <= r["speedup"] <= hi and r["kernels"] == "default / default"
        # from the unrounded speedup and ideal
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal"], abs=2e-3)
    assert rows[0]["dense_img_s"] == rows[1]["dense_img_s"]  # one dense model, timed once
    assert 1.2 < rows[0]["ideal"] < rows[1]["ideal"] < 2.5
    md = throughput.markdown(
        rows, {"batch": 2, "dtype": "float32", "rounds": 2} | {"device": "cpu", "cpus": 2}
    )
    assert f"| {arch.name} | 0.5 |" in md and "default / default |" in md
    with pytest.raises(ValueError, match="unknown CPU kernel set"):
        throughput.measure(arch, [0.5], batch=2, seconds=0.01, rounds=1, kernels="fast")


def test_throughput_bench_meets_a_target_in_either_currency(tmp_path, monkeypatch):
    from amap_jax import latency
    from amap_jax.models.arch import vit_arch
    from bench import throughput

    monkeypatch.setattr(latency, "measure", lambda arch, batch: fake_latency(arch))
    arch = vit_arch("micro", image_size=28, patch_size=7, in_chans=1, num_classes=10)
    rows = throughput.measure(
        arch, [0.9], batch=2, seconds=0.01, rounds=1, kernels="default", kinds=("macs", "latency")
    )
    assert [r["target"] for r in rows] == [0.9, "0.9 latency"]
    assert rows[1]["ideal"] == round(1 / 0.9, 3)


def test_token_speed_buckets_ideals_and_same_round_ratios():
    from amap_jax.models.arch import vit_arch
    from bench import token_speed

    assert token_speed.bucket_set("x8", 197)[-3:] == (184, 192, 197)
    assert token_speed.bucket_set("full", 197) == (197,)
    geo = token_speed.bucket_set("g0.8", 197)
    assert geo[-1] == 197 and min(geo) >= 8 and len(geo) == 15
    # An artifact is compared with the dense artifact, the program with the dense program.
    run = {
        "images_per_s": {
            "dense": [10.0, 20.0],
            "dense artifact": [20.0, 20.0],
            "asvit": [15.0, 40.0],
            "asvit artifact": [30.0, 50.0],
        }
    }
    assert token_speed.summary([run], "asvit") == {
        "img_s": 27.5,
        "speedup": 1.75,
        "range": [1.5, 2.0],
    }
    assert token_speed.summary([run], "asvit artifact")["range"] == [1.5, 2.5]
    # Ideal: dense MACs over the mean MACs of the images at their counts; at the buckets, each
    # batch at the bucket of its largest count.
    arch = vit_arch("mini", in_chans=1, num_classes=10, pattern="SSSS")  # 16 patches
    pruned = arch.replace(token_points=(1, 2, 3))
    full = np.full((4, 3), 16)
    assert token_speed.ideal(arch, pruned, (1, 2, 3), full) == pytest.approx(1.0)
    counts = np.array([[4, 4, 4], [12, 12, 12], [4, 4, 4], [4, 4, 4]])
    exact = token_speed.ideal(arch, pruned, (1, 2, 3), counts)
    one = token_speed.ideal(arch, pruned, (1, 2, 3), counts, (8, 16, 17), 1)
    two = token_speed.ideal(arch, pruned, (1, 2, 3), counts, (8, 16, 17), 2)
    assert exact > one > two > 1.0
    # A batch in parts sorted by count: each part at its own largest count. 4 parts of 4
    # images are each image alone; 2 parts put the 12 with one 4, the other two 4s alone.
    whole = token_speed.ideal(arch, pruned, (1, 2, 3), counts, (8, 16, 17), 4)
    halves = token_speed.ideal(arch, pruned, (1, 2, 3), counts, (8, 16, 17), 4, groups=2)
    quarters = token_speed.ideal(arch, pruned, (1, 2, 3), counts, (8, 16, 17), 4, groups=4)
    assert quarters == pytest.approx(one) and one > halves > whole
    assert halves == pytest.approx(
        token_speed.ideal(arch, pruned, (1, 2, 3), np.array([[15] * 3] * 2 + [[7] * 3] * 2))
    )


def test_token_speed_pads_amap_widths_as_an_export_and_counts_the_unpadded_ones():
    from absl import flags
    from absl.testing import flagsaver

    from amap_jax.models.arch import vit_arch
    from bench import common, token_speed

    arch = vit_arch("mini", in_chans=1, num_classes=10, pattern="SSSS")
    _, _, p_arch, p_params = common.dense_and_pruned(arch, 0.5)
    assert any(b.mlp_dim % 8 for b in p_arch.blocks)  # something to pad
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(token_pad=8):
        padded = token_speed.pad_widths(p_arch, p_params)
    assert padded["choice"] == "x8"
    assert all(b.mlp_dim % 8 == 0 and b.qk_dim % 8 == 0 for b in padded["arch"].blocks)
    assert all(
        p.mlp_dim >= u.mlp_dim for p, u in zip(padded["arch"].blocks, p_arch.blocks, strict=True)
    )
    with flagsaver.flagsaver(token_pad=1):
        assert token_speed.pad_widths(p_arch, p_params)["arch"] == p_arch
    # A token model's CPU kernel set is measured on its channels with every token kept.
    tokened = p_arch.replace(token_points=(1, 2))
    params = {**p_params, "token_gate": {"thresholds": np.zeros(2, np.float32)}}
    a, p = token_speed.untokened(tokened, params)
    assert a == p_arch and "token_gate" not in p and set(p) == set(p_params)


# ----------------------------------------------------------------------------------------------
# Paired statistics of bench/compare.py, on fixed numbers


def test_t_quantiles_are_students():
    from scipy import stats as scipy_stats

    from bench import stats

    for df in range(1, 40):
        assert stats.t95(df) == pytest.approx(
            scipy_stats.t.ppf(0.975, df), abs=2e-3 if df > 30 else 5e-4
        )


def test_interval_of_a_mean_on_fixed_numbers():
    from bench import stats

    got = stats.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * np.sqrt(2.5) / np.sqrt(5)  # t(4) * sd / sqrt(n)
    assert got["mean"] == 3.0 and got["n"] == 5 and got["sd"] == pytest.approx(np.sqrt(2.5))
    assert got["lo"] == pytest.approx(3.0 - half) and got["hi"] == pytest.approx(3.0 + half)


def test_paired_differences_and_verdicts():
    from bench import stats

    amap = {0: 85.0, 1: 86.0, 2: 84.5, 3: 85.5, 4: 86.5}
    # Always 0.4-0.6 below AMAP, seed by seed, though the seeds themselves spread by 2 points:
    # pairing sees it, an unpaired comparison of means would not.
    worse = {s: v - d for (s, v), d in zip(amap.items(), (0.4, 0.5, 0.6, 0.5, 0.4), strict=True)}
    d = stats.paired(worse, amap)
    assert d["mean"] == pytest.approx(-0.48) and d["hi"] < 0 and d["verdict"] == "worse"
    assert stats.paired(amap, worse)["verdict"] == "better"
    noisy = {s: v + e for (s, v), e in zip(amap.items(), (0.5, -0.6, 0.3, -0.2, 0.1), strict=True)}
    d = stats.paired(noisy, amap)
    assert d["lo"] < 0 < d["hi"] and d["verdict"] == "no difference detected at n=5"
    # Only seeds both have are paired.
    assert stats.paired({0: 1.0, 1: 2.0, 9: 5.0}, {0: 0.0, 1: 0.5})["seeds"] == [0, 1]
    assert stats.paired({0: 1.0}, {0: 0.0})["verdict"] == "too few seeds (n=1)"
    assert stats.fmt(stats.paired(worse, amap)).startswith("-0.48 [")


def test_within_a_margin_needs_the_whole_interval():
    from bench import stats

    assert stats.within({"mean": -0.1, "lo": -0.25, "hi": 0.05, "n": 5}, 0.3) == "shown"
    assert stats.within({"mean": -0.1, "lo": -0.45, "hi": 0.25, "n": 5}, 0.3) == (
        "not shown at n=5"
    )
    assert stats.within({"mean": -0.9, "lo": -1.2, "hi": -0.6, "n": 5}, 0.3) == "not within"


def test_docs_page_holds_every_current_result_and_its_tagged_runs(tmp_path, monkeypatch):
    import json

    from bench import common, docs

    meta = {"meta": {"backend": "cpu", "cpus": 2}, "rows": [{"model": "S", "speedup": 1.5}]}
    (tmp_path / "frozen").mkdir()
    for stem in (
        "vs_timm_cpu",
        "vs_timm_cpu_ynn_reduce",
        "frozen/padding_cpu_9315f4a",
        "compare_channels",
    ):
        (tmp_path / f"{stem}.json").write_text(json.dumps(meta))
    for png in ("vs_timm_cpu.png", "vs_timm_cpu_ynn_reduce.png", "compare_channels_top1.png"):
        (tmp_path / png).write_bytes(b"")
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    files = os.listdir(tmp_path)
    assert docs.results_of("vs_timm_cpu", files) == ["vs_timm_cpu", "vs_timm_cpu_ynn_reduce"]
    assert docs.results_of("compare_extras", files) == []
    page = docs.render()
    assert page.count("## vs_timm_cpu") == 2 and "## frozen/padding_cpu_9315f4a" in page
    own = page.split("## vs_timm_cpu_ynn_reduce")[0].split("## vs_timm_cpu:")[1]
    assert "vs_timm_cpu.png" in own and "ynn_reduce.png" not in own  # each run its own plot
    assert "| S | 1.5 |" in page
    # a heading is the bench's first sentence, on one line; its description is on the page once
    title, rest = docs.described("vs_timm")
    assert page.count(f"## vs_timm_cpu_ynn_reduce: {title}\n") == 1 and "\n" not in title
    assert page.count(rest) == 1 and "under vs_timm_cpu above" in page
    assert rest.startswith("```\npython -m bench.vs_timm")  # its command fenced, not run together


def test_docs_mark_a_result_whose_bench_changed_since_as_stale():
    import subprocess

    from bench import docs

    def git(*args):  # bench/vs_timm.py changed in 2 commits after abc1234; nothing else
        if "abc1234..HEAD" not in args:
            raise subprocess.CalledProcessError(128, "git")
        return "f00 one\nf01 two" if "bench/vs_timm.py" in args else ""

    meta = {"commit": "abc1234", "date": "2026-12-01", "argv": ["--batch", "8"]}
    assert docs.provenance(meta, "vs_timm", git).startswith(
        "**Stale**: Made at abc1234 on 2026-12-01 with --batch 8; bench/vs_timm.py changed in 2"
    )
    assert docs.provenance(meta, "padding", git).endswith("bench/padding.py unchanged since.")
    assert "history lacks" in docs.provenance({**meta, "commit": "0ld0ne"}, "padding", git)
    assert docs.provenance({}, "padding", git).startswith("**Unknown provenance**")


def test_readme_tables_are_the_results_they_name():
    """Every table between `<!-- table: STEM [CONFIG] -->` markers in the README is what
    `python -m bench.docs` generates from bench/results/STEM.json: never typed, never stale."""
    from bench import docs

    with open(docs.README) as f:
        text = f.read()
    assert docs._MARKED.search(text), "the README has no generated table"
    assert docs.readme(text) == text, "README tables are stale: run python -m bench.docs"


def test_compare_table_shows_the_reference_and_bold_verdicts():
    from bench import docs

    rows = compare.summarize(_results(), GRID)
    table = docs.compare_table({"rows": rows}, "vit").splitlines()
    assert table[2].startswith("| ViT 0.7 | amap | 5 | 0.698 | 85.50 | 86.00 | 86.50 |")
    random = next(line for line in table if "| random |" in line and "0.298" in line)
    assert random.count("**-0.48 [") == 3  # worse at every stage: bold
    vtp = next(line for line in table if "| vtp |" in line and "0.298" in line)
    assert "**" not in vtp and vtp.startswith("|  | vtp | 5 | 0.298 | +0.")
    # one number of it, inline: the reference's top-1, another method's paired difference
    result = {"rows": rows}
    assert docs.compare_value(result, "vit", 0.3, "amap", "end") == "86.50"
    assert docs.compare_value(result, "vit", 0.3, "random", "after_1_epoch").startswith("-0.48 [")


def test_batch1_option_sets_compile_here_and_reach_both_programs():
    """Every option set `bench.batch1 --options` offers is one this jaxlib accepts (an option
    it dropped would fail the bench after its first rows), and the set reaches the program."""
    from bench import batch1

    x = jnp.ones((4, 8))
    for name, options in batch1.OPTIONS.items():
        hlo = batch1.optimised_hlo(lambda v, y: jnp.tanh(y @ v.T), x, x, options or None)
        assert "tanh" in hlo, name
    # the `xla` set keeps the product out of YNNPACK: the two programs differ
    default = batch1.optimised_hlo(lambda v, y: y @ v.T, x, x)
    assert batch1.optimised_hlo(lambda v, y: y @ v.T, x, x, batch1.OPTIONS["xla"]) != default


def test_batch1_counts_the_launches_of_the_entry_and_of_one_branch():
    """The dropping program's cost at batch 1 is its launches: the entry's operations and,
    per pruning point, one branch of its switch."""
    from bench import batch1

    def two_branches(i, x):
        y = jnp.tanh(x @ x.T)
        z = jax.lax.switch(i, [lambda v: jnp.sin(v) @ v, lambda v: jnp.exp(jnp.cos(v) @ v.T)], y)
        return jnp.sort(z, axis=-1)

    x = jnp.ones((8, 8))
    hlo = jax.jit(two_branches).lower(0, x).compile().as_text()
    entry, branch = batch1.launches(hlo)
    comps = batch1.computations(hlo)
    assert any("conditional(" in line for line in comps["ENTRY"])
    assert entry >= 3 and branch >= 1  # dot + conditional + sort at least; a dot per branch
    plain = jax.jit(lambda x: jnp.tanh(x @ x.T)).lower(x).compile().as_text()
    assert batch1.launches(plain)[1] == 0.0 and batch1.launches(plain)[0] < entry


def test_batch1_ladder_builds_the_program_up_and_starts_at_the_blocks_alone():
    """`bench.batch1`'s ladder: every step with every token kept is the model itself; its
    first step (the bound) keeps the first tokens by a static slice, with no sort or switch
    and fewer launches than the dropping program."""
    from conftest import param_shapes, random_images, random_params

    from amap_jax import models
    from amap_jax.models import tokens
    from amap_jax.models.arch import vit_arch
    from bench import batch1

    arch = vit_arch("mini", in_chans=1, num_classes=10, pattern="SSSS", image_size=16, patch_size=4)
    model = models.build(arch.replace(token_points=(1, 2, 3)))
    params = random_params(param_shapes(model)["params"], 0)
    params["token_gate"]["thresholds"] = np.full(3, -np.inf, np.float32)  # keep every token
    variables, images = {"params": params}, random_images(model.arch, 2, 0)
    masked = jax.jit(model.apply)(variables, images)
    for step in batch1.STEPS:
        every = jax.jit(batch1.cut(model, [arch.num_tokens] * 3, step))(variables, images)
        np.testing.assert_allclose(np.asarray(every), np.asarray(masked), atol=1e-5)
    hlo = batch1.optimised_hlo(batch1.cut(model, (9, 5, 3)), variables, images[:1])
    assert " sort(" not in hlo and " conditional(" not in hlo
    entry, segment = batch1.launches(
        batch1.optimised_hlo(tokens.dropping(model), variables, images[:1])
    )
    assert batch1.launches(hlo)[0] < entry + 3 * segment


def test_ladder_runs_at_a_batch_in_parts_and_its_table_reads_against_the_ideal():
    """`bench.token_ladder`'s steps at batch 2 in 2 parts: every step timed against the dense
    model, each row divided by the ideal, launches shown for batch 1 only."""
    from absl import flags
    from absl.testing import flagsaver
    from conftest import param_shapes, random_images, random_params

    from amap_jax import models
    from amap_jax.models.arch import vit_arch
    from bench import batch1, token_ladder

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    arch = vit_arch("mini", in_chans=1, num_classes=10, pattern="SSSS", image_size=16, patch_size=4)
    model = models.build(arch.replace(token_points=(1, 2, 3), token_groups=2))
    dense = models.build(arch)
    params = random_params(param_shapes(model)["params"], 0)
    dense_params = {k: v for k, v in params.items() if k != "token_gate"}
    images = random_images(model.arch, 4, 0)
    with flagsaver.flagsaver(seconds=0.01, rounds=1):
        steps = batch1.ladder(
            dense, {"params": dense_params}, model, {"params": params}, images, [9, 5, 3], batch=2
        )
    assert [s["step"] for s in steps] == ["dense", *batch1.STEPS, "program"]
    assert all(s["us_per_image"] > 0 and s["speedup"] > 0 for s in steps)
    rows = [
        {"model": "asvit", "batch": b, **s, "of_ideal": s["speedup"] / 2}
        for b in (1, 2)
        for s in steps
    ]
    meta = dict(
        model="m",
        image_size=16,
        points=[1, 2, 3],
        rounds=1,
        cpus=2,
        kernels={},
        sizes={},
        ideals={"asvit": 2.0},
        groups=2,
    )
    table = token_ladder.markdown(meta, rows).splitlines()
    program = [line for line in table if "| program |" in line]
    assert program[0].endswith(f"| {steps[-1]['launches']} |") and program[1].endswith("| - |")
    assert f"{steps[-1]['speedup'] / 2:.2f}" in program[0]


def test_main_job_quotes_the_printed_table_without_this_machines_paths():
    from bench import main_job

    stdout = (
        "12:00:01 model ViT-mini4/7: ...\n"
        "         params   MACs  top-1 %  images/s\n"
        " dense  205,066  3.54M    87.49      4016\n"
        "pruned  142,864  2.48M    87.79      5342\n"
        "MACs ratio 0.700 (target 0.7), top-1 change +0.30, speedup 1.22x ...\n"
        "summary: /tmp/w/summary.json; export: /tmp/w/export; TensorBoard: ...\n"
    )
    table = main_job.printed_table(stdout)
    assert table.splitlines()[0].split() == ["params", "MACs", "top-1", "%", "images/s"]
    assert table.splitlines()[-1].startswith("MACs ratio 0.700")
    assert "/tmp/w" not in table


@pytest.mark.parametrize(
    "name,bad,says",
    [
        ("targets", ["1.5"], "--targets takes shares in (0, 1]"),
        ("targets", ["abc"], "--targets takes shares in (0, 1]"),
        ("token_fractions", ["2"], "--token_fractions takes shares in (0, 1]"),
        ("token_batches", ["x"], "--token_batches takes batch sizes"),
        ("batches", ["inf"], "--batches takes batch sizes"),
        ("jobs", -3, "non-negative"),
        ("seconds", float("inf"), "range"),
    ],
)
def test_bench_flags_are_checked_when_parsed(name, bad, says):
    """A bad number in a bench flag is refused as the flags are parsed (one line naming the flag
    through cli.parse_flags), not when the bench reaches it."""
    from absl import flags
    from absl.testing import flagsaver

    from bench import compare, latency_model, token_speed  # noqa: F401  (their flags)

    with flagsaver.flagsaver(), pytest.raises(flags.IllegalFlagValueError, match=re.escape(says)):
        setattr(flags.FLAGS, name, bad)


def test_compare_names_a_bad_setting_before_any_cell():
    from absl import app

    from bench import compare

    g = compare.GRIDS["channels"]
    with pytest.raises(app.UsageError, match=re.escape("search.target='abc': could not convert")):
        compare.load_config(compare.Cell("vit", compare.DENSE, 1.0, 0), g, {"search.target": "abc"})


def test_a_bench_change_marked_as_keeping_results_leaves_them_current(tmp_path):
    import subprocess

    from bench import docs

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True
        ).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "bench").mkdir()
    module = tmp_path / "bench" / "probe.py"

    def commit(text, message):
        module.write_text(text)
        git("add", "-A")
        git("commit", "-qm", message)
        return git("rev-parse", "--short", "HEAD").strip()

    made = commit("0", "the bench")
    commit("1", f"a flag check\n\n{docs.SAME_RESULTS}")
    meta = {"commit": made, "date": "2026-12-08", "argv": []}
    assert docs.provenance(meta, "probe", git).endswith("bench/probe.py unchanged since.")
    commit("2", "a new timing loop")
    assert "changed in 1 commit(s) since" in docs.provenance(meta, "probe", git)


def test_readme_counts_the_paired_comparisons_a_config_makes():
    from bench import docs

    row = {"top1": {"mean": 1.0}, "vs_amap": {}, "vs_dense": {}}
    rows = [
        {"config": "c", "variant": v, "after search": row, "end": row}
        for v in ("amap", "vtp", "random")
    ] + [{"config": "other", "variant": "vtp", "end": row}]
    assert docs.compare_count({"rows": rows}, "c") == 4  # 2 methods x 2 stages; amap: the reference
