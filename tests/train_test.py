"""Training machinery: data parallelism, resume, the search's MACs target."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import param_shapes, random_params

from amap_jax import config as config_lib
from amap_jax import models
from amap_jax.data import load_source, train_batches
from amap_jax.methods import amap, similarity
from amap_jax.methods.amap import INDICATORS, SIMILARITY, Amap
from amap_jax.methods.projection import PruneSpec
from amap_jax.models import dummy_input
from amap_jax.models.arch import BlockArch, ViTArch
from amap_jax.models.vit import ViT
from amap_jax.train import parallel, steps
from amap_jax.train.checkpoint import Checkpointer, CheckpointError
from amap_jax.train.loop import fit

# 8x8 digits, 2x2 patches of 4x4: a model that compiles and steps in well under a second.
ARCH = ViTArch(
    image_size=8,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=32,
    blocks=(BlockArch("L", 2, 16, 16, 64), BlockArch("S", 2, 16, 16, 64)),
    gelu_approximate=True,
)
INPUTS = steps.Input((0.3,), (0.4,), 8, crop_padding=1, flip=True)


@pytest.fixture(scope="module")
def digits():
    return load_source("digits", "train")


def _dense_state(lr=1e-3):
    model = ViT(ARCH)
    params = model.init(jax.random.key(0), dummy_input(ARCH))["params"]
    tx = steps.per_collection({"params": optax.adamw(lr)})
    return model, tx, steps.create_state({"params": params}, tx)


def _step(model, tx, objective=None):
    objective = objective or steps.Objective(10, label_smoothing=0.1)
    return jax.jit(steps.make_train_step(model, tx, INPUTS, objective, seed=0))


def test_train_step_same_on_1_and_8_devices(digits):
    assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
    model, tx, state = _dense_state()
    batch = next(train_batches(digits, 64, seed=0))
    results = []
    for n in (1, 8):
        mesh = parallel.make_mesh(n)
        s = parallel.replicate(state, mesh)
        new, metrics = _step(model, tx)(s, parallel.shard_batch(batch, mesh))
        assert metrics["loss"].sharding.is_fully_replicated
        results.append((float(metrics["loss"]), jax.device_get(new.trainable)))
    (loss1, p1), (loss8, p8) = results
    assert loss1 == pytest.approx(loss8, rel=1e-5, abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p8)


def _fit(directory, state, model, tx, digits, num_steps, step_fn=None, **kw):
    return fit(
        name="t",
        directory=str(directory),
        state=state,
        step_fn=step_fn or _step(model, tx),
        batches=lambda start: train_batches(digits, 32, seed=3, start_step=start),
        num_steps=num_steps,
        steps_per_epoch=4,
        mesh=parallel.make_mesh(2),
        checkpoint_every=3,
        **kw,
    )


def test_resume_equals_uninterrupted(tmp_path, digits):
    model, tx, state = _dense_state()
    straight = _fit(tmp_path / "a", state, model, tx, digits, 7)
    _, _, state = _dense_state()
    _fit(tmp_path / "b", state, model, tx, digits, 4)  # "interrupted" after step 4
    _, _, fresh = _dense_state()
    resumed = _fit(tmp_path / "b", fresh, model, tx, digits, 7)
    assert int(resumed.step) == int(straight.step) == 7
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(straight.trainable),
        jax.device_get(resumed.trainable),
    )
    # The resumed run did change the weights: the check above is not comparing two inits.
    init = jax.device_get(fresh.trainable)
    diff = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), init, jax.device_get(resumed.trainable)
    )
    assert max(jax.tree.leaves(diff)) > 0


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, digits):
    model, tx, state = _dense_state()
    _fit(tmp_path / "c", state, model, tx, digits, 3)
    for f in (tmp_path / "c" / "3").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot restore checkpoint step 3"):
        Checkpointer(str(tmp_path / "c")).restore(state)


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, digits):
    model, tx, state = _dense_state()
    _fit(tmp_path / "d", state, model, tx, digits, 3)
    other = ARCH.replace(embed_dim=16)
    params = ViT(other).init(jax.random.key(0), dummy_input(other))["params"]
    with pytest.raises(CheckpointError):
        Checkpointer(str(tmp_path / "d")).restore(steps.create_state({"params": params}, tx))


def test_search_reaches_macs_target(digits):
    """The MACs loss alone drives the hard MACs ratio to the target."""
    cfg = config_lib.defaults().amap
    s_arch = ARCH
    params = amap.add_reweight(ARCH, ViT(ARCH).init(jax.random.key(0), dummy_input(ARCH))["params"])
    spec = PruneSpec()
    ind = amap.constant_indicators(s_arch, 5.0)
    sim = similarity.similarity_weights(s_arch, params)
    tx = steps.per_collection({"params": optax.sgd(0.0), INDICATORS: optax.adam(0.1)})
    state = steps.create_state({"params": params, INDICATORS: ind}, tx, {SIMILARITY: sim})
    target = 0.5
    objective = steps.Objective(
        10, regularizer=amap.macs_regularizer(s_arch, target, 50.0, cfg.macs_loss)
    )
    step = _step(ViT(s_arch, sites=Amap()), tx, objective)
    assert amap.hard_ratio(s_arch, state.trainable, spec) > 0.95
    batches = train_batches(digits, 32, seed=0)
    for _ in range(150):
        state, metrics = step(state, next(batches))
    ratio = amap.hard_ratio(s_arch, state.trainable, spec)
    assert abs(float(metrics["macs_ratio"]) - target) < 0.02
    assert abs(ratio - target) < 0.05
    variables = {**state.trainable, **state.extra}
    fixed = amap.finalize_indicators(s_arch, variables, spec, target)
    assert amap.hard_ratio(s_arch, {**variables, INDICATORS: fixed}, spec) <= target


@pytest.mark.parametrize("shift", ["uniform", "cost"])
def test_budget_projection_holds_the_soft_ratio_on_the_aim_at_every_step(shift):
    """Whatever the updates do, after each one the soft MACs ratio is this step's aim (falling
    from 1 to the target over the first half of a 10-step search), and the shift moves every
    indicator by the same delta ("uniform") or by delta x its channel's MACs cost ("cost")."""
    target, total = 0.4, 10
    costs = amap.channel_costs(ARCH)
    flat = np.concatenate([np.ravel(c) for c in jax.tree.leaves(costs)])
    assert np.mean(flat) == pytest.approx(1.0, rel=1e-5) and flat.max() > 1.5 * flat.min()
    if shift == "uniform":
        costs = jax.tree.map(np.ones_like, costs)
    project = amap.budget_projection(ARCH, target, total, ramp=0.5, shift=shift)
    tx = optax.chain(optax.adam(0.3), project)
    ind = amap.constant_indicators(ARCH, 5.0)
    trainable = {"params": {}, INDICATORS: ind}
    state = tx.init(trainable)
    rng = np.random.default_rng(0)
    for step in range(1, total + 1):
        grads = {"params": {}, INDICATORS: jax.tree.map(
            lambda x: rng.normal(size=x.shape).astype(np.float32), ind)}  # fmt: skip
        updates, state = tx.update(grads, state, trainable)
        before = trainable[INDICATORS]
        trainable = optax.apply_updates(trainable, updates)
        aim = amap.scheduled_target(target, step, total, 0.5)
        assert float(amap.soft_ratio(ARCH, trainable[INDICATORS])) == pytest.approx(
            float(aim), abs=1e-4
        )
    assert float(aim) == pytest.approx(target)
    # The projection's part of an update is delta x direction, one delta for every indicator.
    raw = {"params": {}, INDICATORS: jax.tree.map(lambda x: 0.1 * x, before)}
    moved, _ = project.update(raw, project.init(trainable), trainable)
    ratio = jax.tree.map(lambda m, r, c: (m - r) / c, moved[INDICATORS], raw[INDICATORS], costs)
    deltas = np.concatenate([np.ravel(x) for x in jax.tree.leaves(ratio)])
    assert abs(deltas[0]) > 0.01 and np.ptp(deltas) < 1e-4 * max(1.0, abs(deltas[0]))


def test_shared_adam_keeps_relative_gradient_sizes():
    """One second moment for the tree: a gradient 100x smaller moves its indicator 100x less
    (per-indicator Adam moves both the same); a constant gradient gives steps of about 1."""
    grads = {"a": jnp.full((3,), 1.0), "b": jnp.full((2, 2), 0.01)}
    params = jax.tree.map(jnp.zeros_like, grads)
    shared = amap.scale_by_shared_adam()
    state = shared.init(params)
    for _ in range(5):
        steps_shared, state = shared.update(grads, state, params)
    adam = optax.scale_by_adam()
    per, _ = adam.update(grads, adam.init(params), params)
    a, b = float(steps_shared["a"][0]), float(steps_shared["b"][0, 0])
    assert a / b == pytest.approx(100.0, rel=1e-4)
    rms = np.sqrt((3 * 1.0 + 4 * 1e-4) / 7)  # the shared scale: RMS over all 7 indicators
    assert a == pytest.approx(1.0 / rms, rel=1e-3)
    assert float(per["a"][0]) == pytest.approx(float(per["b"][0, 0]), rel=1e-3)


def test_finalize_meets_target_from_dense():
    params = ViT(ARCH).init(jax.random.key(0), dummy_input(ARCH))["params"]
    ind = amap.constant_indicators(ARCH, 5.0)
    spec = PruneSpec(multiple=2)
    variables = {
        "params": params,
        INDICATORS: ind,
        SIMILARITY: similarity.similarity_weights(ARCH, params),
    }
    for target in (0.9, 0.6, 0.3):
        fixed = amap.finalize_indicators(ARCH, variables, spec, target)
        ratio = amap.hard_ratio(ARCH, {INDICATORS: fixed}, spec)
        assert target - 0.1 < ratio <= target
        for blk in fixed.values():
            for g in ("qk", "v"):
                kept = (np.asarray(blk[g]) > 0).sum(-1)
                assert len(set(kept)) == 1 and kept[0] % 2 == 0


def test_unbalanced_finalize_meets_the_target_on_the_padded_count():
    """Without head balancing export pads every head to the widest: the trim counts that."""
    params = ViT(ARCH).init(jax.random.key(0), dummy_input(ARCH))["params"]
    rng = np.random.default_rng(0)
    ind = jax.tree.map(
        lambda x: x + rng.normal(0, 3, x.shape).astype(np.float32),
        amap.constant_indicators(ARCH, 2.0),
    )
    method = Amap(head_balanced=False)
    variables = {
        "params": params,
        INDICATORS: ind,
        SIMILARITY: similarity.similarity_weights(ARCH, params),
    }
    target = round(method.search_ratio(ARCH, variables) - 0.04, 3)
    method = Amap(head_balanced=False, target=target)
    final = method.finalize(ARCH, variables)
    kept = [(np.asarray(final[INDICATORS][f"block_{i}"][g]) > 0).sum(-1) for i in range(2)
            for g in ("qk", "v")]  # fmt: skip
    assert any(k.min() < k.max() for k in kept)  # heads keep different counts
    ratio = method.macs_ratio(ARCH, final)  # of the export, every head padded to the widest
    assert target - 0.03 < ratio <= target


def test_finalize_respects_min_keep_fraction():
    """Flat importances: the fix-up may not empty the groups with the most MACs per channel."""
    params = ViT(ARCH).init(jax.random.key(0), dummy_input(ARCH))["params"]
    variables = {"params": params, INDICATORS: amap.constant_indicators(ARCH, 5.0)}
    spec = PruneSpec(min_keep_fraction=0.5)
    fixed = amap.finalize_indicators(ARCH, variables, spec, 0.6)
    assert amap.hard_ratio(ARCH, {INDICATORS: fixed}, spec) <= 0.6
    for i, block in enumerate(ARCH.blocks):
        for g, width in (("qk", block.qk_dim), ("v", block.v_dim), ("hidden", block.mlp_dim)):
            assert (np.asarray(fixed[f"block_{i}"][g]) > 0).sum(-1).min() >= width / 2
    with pytest.raises(ValueError, match="at its per-head minimum"):
        amap.finalize_indicators(ARCH, variables, spec, 0.3)


def test_attention_difference_init_ranks_channels(digits):
    """A linear block's q/k channel that is ReLU-dead on every token -> lowest initial logit."""
    params = ViT(ARCH).init(jax.random.key(0), dummy_input(ARCH))["params"]
    dead = 3
    for name in ("q", "k"):
        p = params["block_0"]["attn"][name]
        p["kernel"] = p["kernel"].at[:, dead].set(0.0)
        p["bias"] = p["bias"].at[dead].set(-1.0)  # ReLU(.) = 0: only the 1e-6 floor is left
    images = INPUTS(jnp.asarray(digits.get(np.arange(16))["image"]))
    cfg = Amap(init="attn_diff")
    ind = amap.init_indicators(ARCH, params, cfg, images)
    qk = np.asarray(ind["block_0"]["qk"])
    assert qk.reshape(-1).argmin() == dead
    assert np.std(qk) > 0.1  # measured, not constant
    np.testing.assert_array_equal(ind["block_1"]["qk"], cfg.init_logit)  # softmax: constant


def test_mlp_difference_is_the_output_change_of_removing_each_unit(digits):
    """output_diff's MLP rule in closed form equals removing each hidden unit for real; a unit
    whose fc2 row is zero changes nothing and gets the lowest initial logit."""
    params = ViT(ARCH).init(jax.random.key(0), dummy_input(ARCH))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape), params)
    dead = 5
    fc2 = params["block_1"]["mlp"]["fc2"]
    fc2["kernel"] = fc2["kernel"].at[dead].set(0.0)
    images = INPUTS(jnp.asarray(digits.get(np.arange(8))["image"]))
    got = amap.mlp_difference(ARCH, params, images)
    _, inter = ViT(ARCH).apply({"params": params}, images, mutable=["intermediates"])
    for i in range(len(ARCH.blocks)):
        mlp = params[f"block_{i}"]["mlp"]
        y = inter["intermediates"][f"block_{i}"]["mlp_input"][0]
        h = jax.nn.gelu(y @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"], approximate=True)
        out = h @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
        norm = np.linalg.norm(np.asarray(out).reshape(len(out), -1), axis=-1)
        want = []
        for c in range(ARCH.blocks[i].mlp_dim):
            removed = out - h[..., c : c + 1] * mlp["fc2"]["kernel"][c]
            d = np.linalg.norm(np.asarray(out - removed).reshape(len(out), -1), axis=-1)
            want.append(np.mean(d / norm))
        np.testing.assert_allclose(got[f"block_{i}"]["hidden"][0], want, rtol=1e-4, atol=1e-7)
    ind = amap.init_indicators(ARCH, params, Amap(init="output_diff"), images)
    assert np.asarray(ind["block_1"]["hidden"]).reshape(-1).argmin() == dead
    assert np.std(ind["block_1"]["qk"]) > 0.1  # softmax blocks measured too


def test_interrupt_saves_a_checkpoint(tmp_path, digits):
    model, tx, state = _dense_state()
    step = _step(model, tx)
    calls = []

    def interrupted(state, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step(state, batch)

    with pytest.raises(KeyboardInterrupt):
        fit(
            name="t",
            directory=str(tmp_path),
            state=state,
            step_fn=interrupted,
            batches=lambda start: train_batches(digits, 32, seed=3, start_step=start),
            num_steps=100,
            steps_per_epoch=50,
            mesh=parallel.make_mesh(1),
            checkpoint_every=1000,
        )
    assert Checkpointer(str(tmp_path)).latest_step() == 4


def test_weight_decay_only_on_kernels_as_timm():
    """Position embeddings, tokens, relative position tables, FLatten's positional encoding
    and scale, norms, biases and AMAP's reweight are not decayed, whatever their rank."""
    from amap_jax import models
    from amap_jax.models.arch import swin_arch, vit_arch

    for arch in (
        vit_arch("micro", pattern="LS", distilled=True, image_size=32),
        swin_arch("micro", pattern="LLSS"),
    ):
        params = param_shapes(models.build(arch, sites=Amap()))["params"]
        flat = {
            "/".join(getattr(k, "key", str(k)) for k in path): decay
            for path, decay in jax.tree_util.tree_leaves_with_path(steps.decay_mask(params))
        }
        assert {p for p, d in flat.items() if d} == {p for p in flat if p.endswith("kernel")}
        never = ("pos_embedding", "cls", "dist_token", "positional_encoding", "scale", "reweight")
        names = {p.rsplit("/", 1)[-1] for p in flat}
        assert any(n.startswith(never) or "relative" in n for n in names)
        assert not any(d for p, d in flat.items() if p.rsplit("/", 1)[-1].startswith(never))
        assert not any(d for p, d in flat.items() if "relative" in p)
    # in the optimizer: a zero gradient shrinks a kernel and leaves a position embedding alone
    tx = steps.adamw(1e-2, 10, 0, weight_decay=0.5, clip=0.0)
    p = {"pos_embedding": jnp.ones((1, 4, 2)), "fc": {"kernel": jnp.ones((2, 2))}}
    opt_state = tx.init(p)
    for _ in range(2):  # the schedule's learning rate is 0 at step 0
        updates, opt_state = tx.update(jax.tree.map(jnp.zeros_like, p), opt_state, p)
    assert float(jnp.abs(updates["pos_embedding"]).max()) == 0.0
    assert float(updates["fc"]["kernel"].max()) < 0.0


def test_teacher_is_placed_on_the_devices_once(tmp_path, digits):
    """A host teacher passed to `fit` reaches every step as the same device arrays."""
    model, tx, state = _dense_state()
    seen = []
    step = _step(model, tx)

    def step_fn(s, batch, teacher):
        seen.append(teacher["params"]["head"]["kernel"])
        return step(s, batch)

    host_teacher = jax.device_get({"params": state.trainable["params"]})
    _fit(tmp_path / "t", state, model, tx, digits, 3, step_fn, step_args=(host_teacher,))
    assert len(seen) == 3 and all(isinstance(t, jax.Array) for t in seen)
    assert all(t is seen[0] for t in seen) and seen[0].sharding.is_fully_replicated


def test_distilled_deit_learns_its_distillation_head_from_the_teacher(digits):
    """With KD weight 1 the class head gets no gradient (it learns from the labels only) and the
    distillation head learns from the teacher, as in DeiT; without a teacher both heads learn."""
    import dataclasses

    arch = dataclasses.replace(ARCH, distilled=True)
    model = ViT(arch)
    params = random_params(param_shapes(model), seed=1)["params"]
    tx = steps.per_collection({"params": optax.sgd(0.1)})
    state = steps.create_state({"params": params}, tx)
    batch = next(train_batches(digits, 16, seed=0))
    teacher = ViT(ARCH)
    t_params = random_params(param_shapes(teacher), seed=2)
    changed = {}
    for kd, t in ((1.0, teacher), (0.0, None)):
        obj = steps.Objective(10, kd_weight=kd, kd_temperature=1.0)
        step = jax.jit(steps.make_train_step(model, tx, INPUTS, obj, seed=0, teacher=t))
        new, metrics = step(state, batch, t_params) if t else step(state, batch)
        changed[kd] = {
            h: not np.allclose(new.trainable["params"][h]["kernel"], params[h]["kernel"])
            for h in ("head", "head_dist")
        }
        assert np.isfinite(float(metrics["loss"]))
    assert changed[1.0] == {"head": False, "head_dist": True}
    assert changed[0.0] == {"head": True, "head_dist": True}


def test_no_training_accuracy_under_mixup(digits):
    model, tx, state = _dense_state()
    batch = next(train_batches(digits, 16, seed=0))
    plain = _step(model, tx)(state, batch)[1]
    mixed = _step(model, tx, steps.Objective(10, mixup_alpha=0.8, cutmix_alpha=1.0))(state, batch)
    assert "accuracy" in plain and "accuracy" not in mixed[1]


def test_pmap_mode_gives_the_numbers_of_jit_mode(tmp_path):
    """The whole pipeline on 8 fake devices with jax.pmap and with jit: the same accuracies and
    exports (augmentation and mixup partners drawn over the whole batch in both); a pmap work
    directory is then finished by jit mode from its checkpoints, nothing retrained."""
    from conftest import tiny_config

    from amap_jax import load_pruned, pipeline

    runs = {}
    for mode in ("jit", "pmap"):
        c = tiny_config()
        c.parallel, c.num_devices = mode, 8
        c.data.crop_padding, c.data.flip, c.data.mixup_alpha = 1, True, 0.8
        c.eval.batch_size = 96
        c.train.epochs, c.search.epochs, c.finetune.epochs = 1.0, 0.5, 0.5
        runs[mode] = (c, pipeline.run(c, str(tmp_path / mode)))
    (_, sj), (cp, sp) = runs["jit"], runs["pmap"]
    for key in ("dense", "pruned"):
        assert sj[key]["top1"] == sp[key]["top1"]
    assert sj["masked_top1"] == sp["masked_top1"] and sj["arch"] == sp["arch"]
    pj, pp = (load_pruned(s["export_dir"])[1]["params"] for s in (sj, sp))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), pj, pp)
    cp.parallel = "jit"  # the same work directory, the other mode: everything restores
    again = pipeline.run(cp, str(tmp_path / "pmap"))
    assert again["pruned"]["top1"] == sp["pruned"]["top1"]


@pytest.mark.parametrize(
    "budget,moments,shared",
    [("projection", "auto", True), ("lagrange", "auto", False), ("penalty", "auto", False),
     ("projection", "per_channel", False), ("lagrange", "shared", True)],
)  # fmt: skip
def test_indicator_moments_follow_the_budget_unless_set(budget, moments, shared):
    """auto: one shared second moment under the projection; per channel where the MACs term
    is in the gradient (lagrange, penalty)."""
    method = Amap(target=0.5, budget=budget, indicator_moments=moments)
    tx = method.indicator_optimizer(10, ARCH)
    state = tx.init(amap.constant_indicators(ARCH, 5.0) if budget != "projection" else
                    {INDICATORS: amap.constant_indicators(ARCH, 5.0)})  # fmt: skip
    kinds = {
        type(s).__name__ for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "_fields"))
    }
    assert ("SharedAdamState" in kinds) == shared
    assert ("ScaleByAdamState" in kinds) == (not shared)


def _trained_like(seed=0):
    """ARCH's weights drawn so that activations are O(1) (the default init is near-constant)."""
    return random_params(param_shapes(ViT(ARCH))["params"], seed)


def test_linear_qk_gradients_sum_to_zero_and_softmax_ones_do_not(digits):
    """The physics `amap.linear_qk` exists for: scaling every q/k channel of a focused linear
    block leaves its output unchanged, so the straight-through gradients of its q/k indicators
    sum to ~0; a softmax block's do not."""
    params = amap.add_reweight(ARCH, _trained_like())
    images = INPUTS(jnp.asarray(digits.get(np.arange(32))["image"]))
    method = Amap(init="constant", linear_qk="shift")
    ind = amap.constant_indicators(ARCH, 1.0)
    sums = amap.linear_qk_gradient(ARCH, params, ind, images, method)
    assert list(sums) == ["block_0"]  # ARCH is "LS": one linear block
    grads = amap.qk_gradients(ARCH, params, ind, images, method)
    linear, softmax = grads["block_0"], grads["block_1"]
    assert abs(sums["block_0"]) < 1e-4 * float(jnp.sum(jnp.abs(linear)))
    assert abs(float(jnp.sum(softmax))) > 1e-2 * float(jnp.sum(jnp.abs(softmax)))


def test_relevel_ranks_linear_qk_by_the_change_of_removing_them(digits):
    """After `relevel_linear_qk`, removing the linear block's top q/k channel changes its
    attention output more than removing its bottom one, and the q/k indicators lie in the
    range of the same block's value indicators (one currency); softmax blocks are untouched."""
    params = amap.add_reweight(ARCH, _trained_like(1))
    images = INPUTS(jnp.asarray(digits.get(np.arange(32))["image"]))
    rng = np.random.default_rng(0)
    ind = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(2.0, 1.5, x.shape), jnp.float32),
        amap.constant_indicators(ARCH, 0.0),
    )
    out = amap.relevel_linear_qk(ARCH, params, ind, images)
    qk = np.asarray(out["block_0"]["qk"]).ravel()
    v = np.asarray(ind["block_0"]["v"])
    assert v.min() - 0.01 <= qk.min() and qk.max() <= v.max() + 0.01
    assert np.std(qk) > 0.1
    for g in ("qk", "v", "hidden"):
        np.testing.assert_array_equal(out["block_1"][g], ind["block_1"][g])

    _, inter = ViT(ARCH).apply(
        {"params": amap.weights_only(params)}, images, mutable=["intermediates"]
    )
    y = inter["intermediates"]["block_0"]["attn_input"][0]
    attn = models.attention(ARCH, 0)
    variables = {"params": params["block_0"]["attn"]}
    base = attn.apply(variables, y)

    def change(c):
        m = jnp.ones(qk.size).at[c].set(0.0)
        return float(jnp.linalg.norm(attn.apply(variables, y, m) - base))

    assert change(int(qk.argmax())) > change(int(qk.argmin()))


def test_linear_qk_exempt_leaves_them_out_of_the_budget_shift():
    arch = ARCH
    proj = amap.budget_projection(arch, 0.5, 10, 0.0, exempt_linear_qk=True)
    ind = amap.constant_indicators(arch, 3.0)
    zeros = jax.tree.map(jnp.zeros_like, ind)
    updates, _ = proj.update({INDICATORS: zeros}, proj.init(None), {INDICATORS: ind})
    moved = updates[INDICATORS]
    np.testing.assert_array_equal(moved["block_0"]["qk"], 0.0)  # linear q/k: not shifted
    assert float(jnp.max(moved["block_1"]["qk"])) < -1.0  # softmax q/k: shifted down
    assert float(jnp.max(moved["block_0"]["v"])) < -1.0
    # Softmax-only models (ViT, DeiT, Swin without linear stages) search exactly as before.
    softmax = dataclasses.replace(
        ARCH, blocks=tuple(dataclasses.replace(b, attn="S") for b in ARCH.blocks)
    )
    ind = amap.constant_indicators(softmax, 3.0)
    zeros = jax.tree.map(jnp.zeros_like, ind)
    moves = [
        amap.budget_projection(softmax, 0.5, 10, 0.0, exempt_linear_qk=e).update(
            {INDICATORS: zeros}, {"count": jnp.zeros([], jnp.int32)}, {INDICATORS: ind}
        )[0][INDICATORS]
        for e in (True, False)
    ]
    jax.tree.map(np.testing.assert_array_equal, *moves)
    assert not Amap(linear_qk="difference").relevels(softmax)


def test_epoch_lines_show_top1_as_the_summary_does():
    from amap_jax.train import loop

    assert loop._fmt({"test_top1": 78.03, "loss": 0.5}) == "test_top1=78.03 loss=0.5000"
