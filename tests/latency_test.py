"""A latency budget: the cost interface, the latency model's tables, the budgets that charge it,
and a run with `search.budget_kind=latency`."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fake_latency, tiny_config

from amap_jax import config as config_lib
from amap_jax import latency, timing
from amap_jax.methods import amap, baselines, vtp
from amap_jax.models.arch import vit_arch
from amap_jax.pruning import cost, macs, widths

ARCH = vit_arch("mini", in_chans=1, num_classes=10, pattern="LLSS")


def test_a_table_interpolates_between_its_knots_in_numpy_and_under_jit():
    t = cost.Table((1, 8, 16), (1, 4), ((1.0, 2.0), (3.0, 5.0), (4.0, 9.0)))
    assert t(8, 4) == 5.0 and t(1, 1) == 1.0
    assert t(12, 4) == pytest.approx(7.0)  # halfway between 5 and 9
    assert t(4.5, 2.5) == pytest.approx(np.mean([1.0, 2.0, 3.0, 5.0]))  # the cell's centre
    jitted = jax.jit(lambda x, y: t(x, y))
    assert float(jitted(jnp.float32(12.0), jnp.float32(4.0))) == pytest.approx(7.0)
    slope = jax.grad(lambda x: t(x, jnp.float32(4.0)))(jnp.float32(10.0))
    assert float(slope) == pytest.approx(4.0 / 8)
    row = cost.Table((1, 3), (), (2.0, 6.0))
    assert row(2) == pytest.approx(4.0) and row(5) == pytest.approx(10.0)  # extrapolated


def test_macs_is_a_cost_that_counts_what_macs_counts():
    w = [(8, 16, 100)] * len(ARCH.blocks)
    assert cost.MACS.model(ARCH, w) == macs.model_macs(ARCH, w)
    assert cost.MACS.ratio(ARCH) == 1.0


def test_a_latency_model_sums_its_blocks_and_round_trips():
    lat = fake_latency(ARCH)
    full = [macs.widths(b, g.dim) for b, g in zip(ARCH.blocks, ARCH.geometry(), strict=True)]
    blocks = sum(lat.attention[i](w.qk, w.v) + lat.mlp[i](w.hidden) for i, w in enumerate(full))
    assert lat.model(ARCH) == pytest.approx(blocks + 1e-4)
    assert cost.Latency.from_json(json.loads(json.dumps(lat.to_json()))) == lat
    assert lat.with_values(lat.values()) == lat
    assert hash(lat) == hash(dataclasses.replace(lat))  # a method holding it stays hashable
    # Pruned inputs scale their layer by its MACs share.
    smaller = [w._replace(mlp_in=w.mlp_in // 2) for w in full]
    mlp_saved = sum(lat.mlp[i](w.hidden) for i, w in enumerate(full)) * (1 - 0.75)
    assert lat.model(ARCH) - lat.model(ARCH, smaller) == pytest.approx(mlp_saved)
    with pytest.raises(ValueError, match="token pruning"):
        lat.block(ARCH, 0, None, tokens=5)


def test_knots_hold_the_ends_and_multiples_of_eight():
    assert latency.knots(64) == (1, 16, 32, 48, 64)
    assert latency.knots(16) == (1, 4, 8, 12, 16)
    assert latency.knots(3) == (1, 2, 3)
    assert latency.knots(256, 3) == (1, 128, 256)


def test_widths_at_a_latency_target_follow_the_latency_model():
    """Where the MLP's hidden units cost no time, a latency target takes its budget out of the
    attention and keeps the MLP, which a MACs target would prune."""
    scores = [
        {s: np.random.default_rng(i).random(shape) for s, shape in amap.group_shapes(b).items()}
        for i, b in enumerate(ARCH.blocks)
    ]
    free_mlp = fake_latency(ARCH, mlp_scale=0.0, constant=0.0)
    plan = widths.at_target(ARCH, scores, 0.6, cost=free_mlp)
    assert plan.ratio <= 0.6 and plan.ratio == pytest.approx(
        widths.ratio(ARCH, plan.counts, cost=free_mlp)
    )
    by_macs = widths.at_target(ARCH, scores, 0.6)
    kept = lambda p, site: np.mean([c[site] for c in p.counts])  # noqa: E731
    assert kept(plan, "hidden") == 256 > kept(by_macs, "hidden")  # free: kept whole
    assert all(c["qk"] < 32 and c["v"] < 32 for c in plan.counts)


def test_every_budget_charges_the_cost_it_is_given():
    lat = fake_latency(ARCH)
    ones = vtp.Vtp().initialize(ARCH, None, calibration=None, seed=0)[vtp.SCORES]
    method = vtp.Vtp(target=0.5, cost=lat)
    cut = {vtp.SCORES: method.finalize(ARCH, {vtp.SCORES: ones})[vtp.SCORES]}
    assert method.cost_ratio(ARCH, cut) <= 0.5 + 1e-9
    assert method.macs_ratio(ARCH, cut) != pytest.approx(method.cost_ratio(ARCH, cut), abs=1e-3)
    uniform = baselines.uniform_widths(ARCH, baselines.Random(target=0.5, cost=lat))
    assert lat.ratio(ARCH, [tuple(k for _, k in c) for c in uniform]) <= 0.5
    with pytest.raises(ValueError, match="cannot reach latency ratio 0.01"):
        amap.Amap(target=0.01, cost=lat).check(ARCH)


def test_the_projection_holds_a_soft_latency_ratio_on_its_aim():
    import optax

    lat = fake_latency(ARCH)
    project = amap.budget_projection(ARCH, 0.5, 4, ramp=0.0, cost=lat)
    ind = amap.constant_indicators(ARCH, 5.0)
    trainable = {"params": {}, amap.INDICATORS: ind}
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = project.update(zeros, project.init(trainable), trainable)
    moved = optax.apply_updates(trainable, updates)[amap.INDICATORS]
    assert float(amap.soft_ratio(ARCH, moved, cost=lat)) == pytest.approx(0.5, abs=1e-4)
    assert float(amap.soft_ratio(ARCH, moved)) != pytest.approx(0.5, abs=1e-3)  # not MACs


def test_measure_times_each_layer_shape_once_and_caches_it(tmp_path, monkeypatch):
    cache = str(tmp_path / "latency.json")
    calls = []
    real = timing.interleaved
    monkeypatch.setattr(
        timing, "interleaved", lambda fns, *a: calls.append(len(fns)) or real(fns, *a)
    )
    arch = vit_arch("micro", in_chans=1, num_classes=10, pattern="LS")
    arch = arch.replace(blocks=(arch.blocks[0], *arch.blocks))  # two linear blocks, one shape
    lat = latency.measure(arch, 1, count=2, seconds=0.002, rounds=1, cache=cache)
    # attention: 2x2 knots per kind (linear, softmax), one MLP shape, the dense model.
    assert sorted(calls) == [1, 2, 4, 4]
    assert lat.attention[0] == lat.attention[1] != lat.attention[2]
    for t in (*lat.attention, *lat.mlp):
        s = np.asarray(t.seconds)
        assert (s > 0).all() and (np.diff(s, axis=0) > 0).all()  # wider is never faster
    assert lat.model(arch) == pytest.approx(lat.constant + sum(
        lat.block(arch, i, None) for i in range(3)), rel=1e-9)  # fmt: skip
    calls.clear()
    again = latency.measure(arch, 1, count=2, seconds=0.002, rounds=1, cache=cache)
    assert calls == [] and again == lat
    with pytest.raises(ValueError, match="token pruning"):
        latency.measure(
            dataclasses.replace(arch, token_points=(1,)), 1, count=2, seconds=0.002, cache=None
        )


def test_config_names_a_latency_budget_it_can_charge():
    c = tiny_config()
    c.search.budget_kind = "seconds"
    with pytest.raises(ValueError, match="search.budget_kind must be one of macs, latency"):
        config_lib.validate(c)
    c = tiny_config()
    c.search.budget_kind, c.method = "latency", "asvit"
    with pytest.raises(ValueError, match="asvit prunes tokens per image"):
        config_lib.validate(c)
    c = tiny_config()
    c.search.latency_batch = 0
    with pytest.raises(ValueError, match="search.latency_batch must be in"):
        config_lib.validate(c)


def test_a_run_with_a_latency_target_reports_it_predicted_and_timed(tmp_path, monkeypatch):
    from amap_jax import pipeline

    # Timing is measure's test; a run's must not hang on how busy the machine is.
    monkeypatch.setattr(latency, "measure", lambda arch, *a, **k: fake_latency(arch))
    c = tiny_config()
    c.search.budget_kind, c.search.target = "latency", 0.8
    c.train.epochs, c.search.epochs, c.finetune.epochs = 0.5, 0.5, 0.0
    workdir = str(tmp_path / "run")
    s = pipeline.run(c, workdir)
    b = s["budget"]
    assert b["kind"] == "latency" and b["batch"] == 1 and b["tolerance"] == 0.05
    stored = cost.Latency.from_json(json.load(open(os.path.join(workdir, "latency.json"))))
    from amap_jax.data.splits import open_split
    from amap_jax.io import pruned

    p_arch = pruned.read_arch(s["export_dir"])
    arch = pipeline.build_arch(c, open_split(c.data, c.data.train_split).info)
    assert b["predicted"] == round(stored.of(arch, p_arch), 4)
    assert b["predicted"] <= 0.8 + 1e-4 and b["achieved"] == b["measured"]
    low, high = b["measured_range"]
    assert low <= b["measured"] <= high and b["met"] == (abs(b["measured"] - 0.8) <= 0.05)
    assert f"latency ratio at batch 1: {b['measured']:.3f} timed" in pipeline.format_summary(s)
    # A resumed run charges the model it started with, not a new measurement.
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("measured again"))
    ctx, arch = pipeline.make_context(c, workdir)
    assert pipeline.budget_cost(ctx, arch) == stored
