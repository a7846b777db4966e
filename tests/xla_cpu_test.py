"""CPU kernel sets: same logits as the default set, the fastest measured and cached, the user's
XLA_FLAGS respected, bad names rejected."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import param_shapes, random_images, random_params

from amap_jax import export_speed, models, xla_cpu
from amap_jax.config import defaults, validate
from amap_jax.models.arch import vit_arch


@pytest.fixture
def fresh_usable():
    xla_cpu.usable.cache_clear()
    yield
    xla_cpu.usable.cache_clear()


def _model(pattern: str):
    arch = vit_arch("micro", pattern=pattern)
    return arch, random_params(param_shapes(models.build(arch))["params"], 0)


def test_sets_this_jaxlib_does_not_know_are_left_out(fresh_usable, monkeypatch):
    monkeypatch.setitem(xla_cpu.SETS, "bogus", {"xla_cpu_no_such_option": "1"})
    # what the CPU benchmarks measure (jaxlib 0.10.2 and 0.12.0.1 know the option)
    assert xla_cpu.usable() == ("default", "ynn_reduce", "xla")
    jitted = xla_cpu.jit(lambda x: x + 1, "bogus")  # compiled with the default set instead
    assert float(jitted(1.0)) == 2.0


@pytest.mark.parametrize("pattern", ["SS", "LS"])
def test_every_usable_set_gives_the_default_logits(pattern):
    arch, params = _model(pattern)
    net = models.build(arch)
    x = random_images(arch, 4, seed=1)
    want = np.asarray(jax.jit(net.apply)({"params": params}, x))
    for name in xla_cpu.usable():
        fn = xla_cpu.jit(net.apply, name)
        np.testing.assert_allclose(fn({"params": params}, x), want, atol=1e-5, rtol=1e-5)
        if name == "ynn_reduce":  # the option reached the compiler: reductions left to YNNPACK
            hlo = fn.lower({"params": params}, x).compile().as_text()
            assert '"kind":"__ynn_fusion"' in hlo


def test_users_xla_flags_leave_only_the_default_set(fresh_usable, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert xla_cpu.usable() == ("default",)
    assert export_speed.fastest_kernels(*_model("SS"), 4, cache=None) == ("default", {})


def test_unknown_set_is_rejected():
    with pytest.raises(ValueError, match="unknown CPU kernel set 'fast'"):
        xla_cpu.jit(lambda x: x, "fast")
    c = defaults()
    c.cpu_kernels = "fast"
    with pytest.raises(ValueError, match="cpu_kernels must be one of default, ynn_reduce"):
        validate(c)


@pytest.mark.parametrize("faster", ["default", "ynn_reduce", "xla"])
def test_fastest_kernels_keeps_the_fastest_set_and_caches_it(tmp_path, monkeypatch, faster):
    arch, params = _model("SS")
    rounds = []

    def timed(fns, seconds, n, batch):  # `faster` runs 1.2x every other set, every round
        rounds.append(sorted(fns))
        return {k: [120.0 if k == faster else 100.0] * n for k in fns}

    monkeypatch.setattr("amap_jax.timing.interleaved", timed)
    cache = str(tmp_path / "padding.json")
    name, gains = export_speed.fastest_kernels(arch, params, 4, rounds=2, cache=cache)
    assert rounds == [["default", "xla", "ynn_reduce"]]
    assert name == faster
    base = 1.2 if faster == "default" else 1.0
    want = {k: (1.2 if k == faster else 1.0) / base for k in xla_cpu.SETS}
    assert gains == pytest.approx(want)
    assert export_speed.fastest_kernels(arch, params, 4, cache=cache) == (name, gains)
    assert len(rounds) == 1  # cached
