"""bench/compare.py's report: seeds aggregated, targets judged from the numbers, token rows."""

from __future__ import annotations

import numpy as np
import pytest

from bench import compare


def _cell(config, variant, target, seed, top1, **extra):
    cell = {
        "config": config,
        "variant": variant,
        "target": target,
        "seed": seed,
        "top1": top1,
        "macs_ratio": target,
        "speedup": 1 / target,
        "ideal_speedup": 1 / target,
        "wall_s": 60.0,
    }
    if variant != compare.DENSE_BUDGET:
        cell.update(before_finetune_top1=top1 - 1, export_max_logit_diff=1e-6 * (seed + 1))
    return {**cell, **extra}


def _channel_cells():
    tops = {"amap": (88.2, 88.0), "vtp": (88.3, 88.1), "magnitude": (88.0, 87.9), "random": (87.5,)}
    cells = [_cell("vit", compare.DENSE_BUDGET, 1.0, s, 88.4) for s in (0, 1)]
    for method, values in tops.items():
        cells += [_cell("vit", method, 0.7, s, t) for s, t in enumerate(values)]
    return cells


def test_rows_hold_mean_and_spread_over_seeds():
    rows = compare.aggregate(_channel_cells())
    amap = compare._find(rows, "vit", "amap", 0.7)
    assert (amap["seeds"], amap["top1_mean"], amap["top1_sd"]) == (2, 88.1, 0.14)
    assert amap["before_finetune_mean"] == 87.1 and amap["max_logit_diff"] == 2e-6
    assert compare._find(rows, "vit", "random", 0.7)["top1_sd"] == 0.0  # one seed: no spread


def test_verdicts_follow_the_numbers():
    rows = compare.aggregate(_channel_cells())
    notes = compare.verdicts(rows, {"vit": {"top1": 88.0}})
    # AMAP is 0.30 below the equal-budget dense model: within the 0.3 allowed at 0.7
    assert any("AMAP 88.10 vs equal-budget dense 88.40" in n and n.endswith(": met") for n in notes)
    order = [n for n in notes if "order" in n]
    assert order == [
        "vit, 0.7: order vtp > amap > magnitude > random "
        "(vtp 88.20, amap 88.10, magnitude 87.95, random 87.50): not met"
    ]
    # a tie is not an order, and differences within the seeds' spread are said to be
    cells = [c for c in _channel_cells() if c["variant"] in ("amap", "vtp")]
    cells = [{**c, "top1": 88.0 + 0.1 * c["seed"]} for c in cells]
    notes = compare.verdicts(compare.aggregate(cells), {"vit": {"top1": 88.0}})
    assert notes == [
        "vit, 0.7: order amap > vtp (amap 88.05, vtp 88.05; all within 0.00 points, seed sd up "
        "to 0.07): not met"
    ]


def test_token_rows_report_kept_tokens_and_both_speedups():
    tok = dict(kept_tokens_of=100, speedup_batch1=1.2, images_per_s=700.0, images_per_s_batch1=200)
    cells = [_cell("tokens", compare.DENSE_BUDGET, 1.0, s, 80.0) for s in (0, 1)]
    cells += [
        _cell("tokens", "asvit", 0.5, s, 79.7, kept_tokens_mean=[50.0 + s, 30.0], **tok)
        for s in (0, 1)
    ]
    cells += [_cell("tokens", "amap", 0.5, s, 79.0) for s in (0, 1)]
    cells += [
        _cell("tokens", "amap+asvit", 0.5, s, 79.8, kept_tokens_mean=[60.0, 40.0], **tok)
        for s in (0, 1)
    ]
    rows = compare.aggregate(cells)
    asvit = compare._find(rows, "tokens", "asvit", 0.5)
    assert asvit["kept_tokens_mean"] == [50.5, 30.0] and asvit["speedup_batch1"] == 1.2
    notes = compare.verdicts(rows, {"tokens": {"top1": 79.5}})
    # 2.0x at 0.3 points below dense: met; the combination is above both: met
    assert any(n.startswith("tokens, 0.5: AS-ViT 2.00x") and n.endswith(": met") for n in notes)
    assert any(
        n.startswith("tokens, 0.5: AMAP+AS-ViT 79.80") and n.endswith(": met") for n in notes
    )
    table = compare.markdown(rows, {"tokens": {"top1": 79.5}}, notes)
    assert "| 0.5 | asvit | 79.70 ± 0.00 |" in table and "50 / 30 of 100" in table


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
    from bench import dense_profile

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
    from bench import common, search_multiple

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
        attention_core,
        common,
        dense_profile,
        dtype,
        padding,
        search_multiple,
        search_step,
        throughput,
        token_speed,
        vs_timm,
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
    from bench import padding as padding_bench

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
    from bench import attention_core

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
