"""Parity with the reference implementations: timm models with random weights, imported into
amap_jax, give the same logits (fp32, max abs diff <= 1e-4). torch and timm are test
dependencies (requirements-torch.txt); these tests fail, never skip, without them."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch_reference

from amap_jax.io.pretrained import (
    CheckpointMismatchError,
    import_pretrained,
    read_state_dict,
    resize_grid,
)


@pytest.mark.parametrize(
    "name",
    ["deit_small_patch16_224", "deit_base_distilled_patch16_224", "swin_tiny_patch4_window7_224"],
)
def test_timm_parity(name, tmp_path):
    torch, _ = torch_reference.load()
    ref = torch_reference.timm_model(name, seed=0)
    images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    want = torch_reference.timm_logits(ref, images)
    # Through a file, as users import: the .pth is read with weights_only=True.
    path = tmp_path / "model.pth"
    torch.save({"model": ref.state_dict()}, path)
    model, variables = import_pretrained(path, name)
    got = np.asarray(jax.jit(model.apply)(variables, images))
    diff = float(np.abs(got - want).max())
    print(f"{name}: max abs logit diff {diff:.2e} (max |logit| {np.abs(want).max():.2f})")
    assert np.abs(want).max() > 0.5  # non-trivial logits
    assert diff <= 1e-4
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(np.size(x) for x in jax.tree.leaves(variables)) == n_ref


@pytest.fixture(scope="module")
def deit_state():
    torch, _ = torch_reference.load()
    ref = torch_reference.timm_model("deit_tiny_patch16_224", seed=1)
    return ref, torch_reference.state_dict_numpy(ref)


def test_safetensors_and_state_dict_give_the_same_model(deit_state, tmp_path):
    from safetensors.numpy import save_file

    ref, state = deit_state
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    images = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
    model, from_file = import_pretrained(path, "deit_tiny_patch16_224")
    _, from_dict = import_pretrained(state, "deit_tiny_patch16_224")
    a = np.asarray(model.apply(from_file, images))
    np.testing.assert_array_equal(a, np.asarray(model.apply(from_dict, images)))
    assert np.abs(a - torch_reference.timm_logits(ref, images)).max() <= 1e-4


def test_mismatched_checkpoint_lists_every_problem(deit_state):
    _, state = deit_state
    bad = dict(state)
    del bad["blocks.3.mlp.fc1.bias"]
    bad["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    bad["blocks.1.norm1.weight"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        import_pretrained(bad, "deit_tiny_patch16_224")
    msg = str(e.value)
    assert "missing: blocks.3.mlp.fc1.bias" in msg
    assert "unexpected: blocks.0.attn.extra" in msg
    assert "wrong shape: blocks.1.norm1.weight" in msg
    with pytest.raises(CheckpointMismatchError, match="missing: .*dist_token"):
        import_pretrained(state, "deit_tiny_distilled_patch16_224")  # not a distilled model
    with pytest.raises(ValueError, match="unknown pretrained architecture 'deit_huge"):
        import_pretrained(state, "deit_huge_patch16_224")


def test_official_training_checkpoint_loads_weights_only(tmp_path, monkeypatch):
    """The official FLatten code saves {'model', 'optimizer', ..., 'config': yacs CfgNode}: the
    weights load (the config as an inert dict); any other pickled object is refused."""
    torch, _ = torch_reference.load()
    package = tmp_path / "yacs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("class CfgNode(dict):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from yacs.config import CfgNode

    path = tmp_path / "ckpt_epoch_299.pth"
    weights = {"head.weight": torch.ones(2, 3)}
    config = CfgNode(MODEL=CfgNode(TYPE="flatten_swin"))
    torch.save({"model": weights, "epoch": 299, "max_accuracy": 82.1, "config": config}, path)
    state = read_state_dict(path)
    assert list(state) == ["head.weight"] and state["head.weight"].shape == (2, 3)

    other = tmp_path / "other.pth"
    torch.save({"model": weights, "config": _Config()}, other)
    with pytest.raises(CheckpointMismatchError, match="never unpickled"):
        read_state_dict(other)


class _Config:  # stands in for an arbitrary object pickled into a checkpoint
    pass


def test_resize_and_new_head(deit_state):
    """Another input size resizes the position grid (prefix tokens untouched); another number
    of classes gives a fresh zero head."""
    _, state = deit_state
    model, variables = import_pretrained(
        state, "deit_tiny_patch16_224", image_size=160, num_classes=10
    )
    p = variables["params"]
    assert p["pos_embedding"].shape == (1, 1 + 10 * 10, 192)
    np.testing.assert_array_equal(p["pos_embedding"][:, 0], state["pos_embed"][:, 0])
    assert p["head"]["kernel"].shape == (192, 10) and not np.any(p["head"]["kernel"])
    logits = model.apply(variables, np.zeros((1, 160, 160, 3), np.float32))
    assert logits.shape == (1, 10)
    # resizing to the same grid is the identity; a smooth grid stays smooth
    grid = state["pos_embed"][:, 1:]
    np.testing.assert_array_equal(resize_grid(grid, 14), grid)
    ramp = np.linspace(0, 1, 14, dtype=np.float32)
    plane = (ramp[:, None] + ramp[None, :]).reshape(1, 196, 1)
    up = resize_grid(plane, 28).reshape(28, 28)
    assert np.all(np.diff(up, axis=0) >= -1e-6) and np.all(np.diff(up, axis=1) >= -1e-6)
