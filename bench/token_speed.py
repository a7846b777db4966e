"""Token dropping at the paper's scale: DeiT-S/16 at 224 px (197 tokens), AS-ViT's points.

  python -m bench.token_speed [--model S] [--token_batches 1,64] [--token_points 4,7,10]
      [--token_fractions 0.7,0.5,0.35] [--token_images 128] [--token_amap_target 0.7]
      [--token_buckets x8,x16,g0.8] [--token_groups 4] [--token_pad 0] [--kernels measure]
      [--rounds 5] [--seconds 4] [--alternations 2] [--tag T]

Random weights (speed does not depend on them) and random images. Pruning points before blocks
4, 7 and 10; each point's threshold is the quantile of its scores (measured on the benchmark
images with the masked forward, point by point) at which the kept shares of the patch tokens
are about 0.7 / 0.5 / 0.35. The kept counts and the ideal speedup (dense MACs / the mean MACs
of the images at their own counts, `amap_jax.pruning.macs`) are printed beside each measured
one, and the ideal at the counts the program runs beside that: the buckets, each the largest
count of its part of the batch rounded up (a batch runs in `--token_groups` parts sorted by
kept count, `ViTArch.token_groups`; rows "1 part" time the same model with the whole batch at
its largest count, as before parts).

Timed against the dense model, float32, at each batch size: the AS-ViT model through
`models.tokens.dropping` (one compiled program, `tokens.predict`'s, weights as arguments)
against the dense model run the same way (`model.apply`, weights as arguments), and its
forward.jax artifact loaded with jax alone (`jax.export.deserialize(...).call`, jitted, weights
as constants) against the dense model's artifact: XLA compiles constant weights differently (at
batch 1 on CPU they run faster), so each is compared with its like. The same rows for
AMAP+AS-ViT (AMAP's widths at `--token_amap_target` MACs, `bench.common.dense_and_pruned`, x
tokens at the same shares). As the pipeline exports a model: AMAP's widths padded as
`export_pad` pads them (`--token_pad`; 0: measured, `export_speed.measured`; the ideal counts the
unpadded widths) and each model compiled with its CPU kernel set (`--kernels`; measure: its
fastest, `export_speed.fastest_kernels` on its channels with every token kept). Every call takes
the next batch of the benchmark images, so the kept counts vary as they would. Rounds
interleave the models (`amap_jax.timing.interleaved`); a speedup is the median of the
same-round ratios, with their range.

Beside it, in its own process (alternated with the jax rounds, `--alternations`): timm's DeiT-S
dense, and with the same kept counts per image by the gather a PyTorch user would write (in the
block before each point the attention is computed unfused for the class token's attention,
averaged over heads; the top-scored patch tokens are gathered, the batch's largest count of
them). The bucket sets of `--token_buckets` (x8: multiples of 8 and the full count; g0.8: a
geometric set of ratio 0.8; full: the full count alone) are compared by compile time, artifact
size and the ideal at their buckets. Writes bench/results/token_speed[_TAG].{json,md}.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
from absl import flags

from amap_jax.timing import cycling, interleaved
from bench import common, sides

_BATCHES = flags.DEFINE_list("token_batches", ["1", "64"], "Batch sizes timed.")
_POINTS = flags.DEFINE_list("token_points", ["4", "7", "10"], "Blocks before which tokens go.")
_FRACTIONS = flags.DEFINE_list(
    "token_fractions", ["0.7", "0.5", "0.35"], "Share of the patch tokens kept at each point."
)
common.check_list(_BATCHES, int, lambda b: b >= 1, "batch sizes (integers >= 1)")
common.check_list(_POINTS, int, lambda p: p >= 0, "block indices (integers >= 0)")
common.check_list(_FRACTIONS, float, lambda f: 0 < f <= 1, "shares in (0, 1]")
_IMAGES = flags.DEFINE_integer(
    "token_images", 128, "Benchmark images (cycled through).", lower_bound=1
)
_AMAP_TARGET = flags.DEFINE_float(
    "token_amap_target", 0.7, "AMAP's channel MACs target.", lower_bound=0.01, upper_bound=1.0
)
_BUCKETS = flags.DEFINE_list(
    "token_buckets",
    ["x8", "x16", "g0.8"],
    "Bucket sets compared (xM, gR, full); the first is timed.",
)
_PAD = flags.DEFINE_integer(
    "token_pad",
    0,
    "AMAP's widths padded as export_pad pads them: 0 measured (export_speed.measured, at the "
    "largest timed batch), 1 unpadded, M a multiple of M.",
    lower_bound=0,
)
_GROUPS = flags.DEFINE_integer(
    "token_groups",
    4,
    "Parts a batch runs in after each point (models.tokens.GROUPS).",
    lower_bound=1,
)
_COUNTS = flags.DEFINE_string("token_counts", None, "Internal: the torch worker's kept counts.")


def bucket_set(spec: str, n: int) -> tuple[int, ...]:
    """`xM`: multiples of M and `n`; `gR`: `n` times powers of R, down to 8; `full`: `n`."""
    if spec == "full":
        return (n,)
    if spec.startswith("x"):
        m = int(spec[1:])
        return (*range(m, n, m), n)
    if spec.startswith("g"):
        r, out, b = float(spec[1:]), set(), float(n)
        while b >= 8:
            out.add(int(np.ceil(b)))
            b *= r
        return tuple(sorted(out | {n}))
    raise ValueError(f"unknown bucket set {spec!r}: xM, gR or full")


def speedups(runs: list[dict], name: str, base: str = "dense") -> list[float]:
    """`name` over `base` images/s in every round of every run (same-round ratios)."""
    return [
        p / d
        for r in runs
        for p, d in zip(r["images_per_s"][name], r["images_per_s"][base], strict=True)
    ]


def base_of(name: str) -> str:
    """What a row's speedup is over: the dense artifact for an artifact, else the dense model
    run the same way."""
    return "dense artifact" if name.endswith(" artifact") else "dense"


def summary(runs: list[dict], name: str) -> dict:
    s = speedups(runs, name, base_of(name))
    rates = [v for r in runs for v in r["images_per_s"][name]]
    return {
        "img_s": round(float(np.median(rates)), 2),
        "speedup": round(float(np.median(s)), 3),
        "range": [round(float(min(s)), 3), round(float(max(s)), 3)],
    }


# -- jax side ------------------------------------------------------------------------------


def _random_params(shapes, seed: int):
    """N(0, 1/fan_in) kernels, LayerNorm scales 1 + N(0, 0.04), the rest N(0, 0.04): attention
    that is not uniform, so that scores and kept counts vary between images."""
    import jax

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if names[-1] == "kernel":
            return z / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
        if names[-1] == "scale" and len(names) > 1 and names[-2].startswith("norm"):
            return 1.0 + 0.2 * z
        return 0.2 * z

    return jax.tree_util.tree_map_with_path(draw, shapes)


def token_model(arch, points, images, fractions, seed: int):
    """(model, params) of `arch` with random weights, dropping tokens before `points` at
    thresholds that keep `fractions` of the patch tokens of `images`, set point by point."""
    import jax
    import jax.numpy as jnp

    from amap_jax import models
    from amap_jax.models import tokens

    arch = arch.replace(token_points=points)
    model = models.build(arch)
    shapes = jax.eval_shape(model.init, jax.random.key(0), models.dummy_input(arch))["params"]
    params = _random_params(shapes, seed)
    patches, prefix = arch.grid**2, arch.num_prefix

    def scores_at(k):
        def fn(m, x):
            h, keep, stats = m.embed(x), None, None
            for i in range(points[k]):
                if i in points:
                    keep = m.token_gate(points.index(i), stats, keep)
                h, stats = m.run(h, i, i + 1, keep, stats=i + 1 in points)
            s = tokens.score(stats, m.arch)
            return s, jnp.ones_like(s) if keep is None else keep

        return jax.jit(lambda v, x: model.apply(v, x, method=fn))

    thresholds = np.full(len(points), -np.inf, np.float32)
    for k, f in enumerate(fractions):
        params["token_gate"]["thresholds"] = thresholds.copy()
        fn = scores_at(k)
        out = [fn({"params": params}, images[i : i + 32]) for i in range(0, len(images), 32)]
        s = np.concatenate([np.asarray(o[0])[:, prefix:] for o in out])
        keep = np.concatenate([np.asarray(o[1])[:, prefix:] for o in out]) > 0
        share = min(1.0, f * patches * len(images) / max(keep.sum(), 1))
        thresholds[k] = np.quantile(s[keep], 1 - share)
    params["token_gate"]["thresholds"] = thresholds
    return model, params


def kept(model, params, images) -> np.ndarray:
    """[images, points] patch tokens each image keeps (the dropping forward's own count)."""
    from amap_jax.models import tokens

    fn = tokens.compiled(model)
    return np.concatenate(
        [
            np.asarray(fn({"params": params}, images[i : i + 32])[1])
            for i in range(0, len(images), 32)
        ]
    )


def ideal(
    dense_arch, arch, points, counts: np.ndarray, buckets=None, batch: int = 1, groups: int = 1
) -> float:
    """Dense MACs / mean MACs of an image: at its own counts, or (`buckets`) at the bucket of
    the largest count of its part of its batch (batches of `batch` in order, each sorted by
    count at each point into `groups` parts of ceil(batch / groups) images, as
    `models.tokens.dropping` runs them)."""
    from amap_jax.pruning import macs

    n = counts + arch.num_prefix
    if buckets is not None:
        per = -(-batch // groups)
        n = n[: len(n) // batch * batch].reshape(-1, batch, n.shape[1])
        n = -np.sort(-n, axis=1)  # each batch's counts, largest first, per point
        for start in range(0, batch, per):
            n[:, start : start + per] = n[:, start : start + 1]  # a part's largest count
        n = n.reshape(-1, n.shape[-1])
        n = np.asarray(buckets)[np.searchsorted(buckets, n)]
    per_image = macs.model_macs(arch, None, macs.token_counts(arch, points, list(n.T)))
    return float(macs.model_macs(dense_arch) / np.mean(per_image))


def _batches(images, b: int):
    import jax

    return [jax.device_put(images[i : i + b]) for i in range(0, len(images) // b * b, b)]


def setup():
    """The dense and both token-dropping models, the images and their kept counts."""
    import jax

    from amap_jax import models
    from amap_jax.models.arch import vit_arch

    dense = vit_arch(sides.MODEL.value, image_size=sides.IMAGE.value)
    points = tuple(int(p) for p in _POINTS.value)
    fractions = [float(f) for f in _FRACTIONS.value]
    size = dense.image_size
    images = np.random.default_rng(0).standard_normal((_IMAGES.value, size, size, 3))
    images = images.astype(np.float32)
    shapes = jax.eval_shape(models.build(dense).init, jax.random.key(0), models.dummy_input(dense))
    dense_params = _random_params(shapes["params"], 0)
    _, _, p_arch, p_params = common.dense_and_pruned(dense, _AMAP_TARGET.value)
    padded = pad_widths(p_arch, p_params)
    out = {"dense": (dense, dense_params), "images": images, "points": points, "pad": padded}
    # the MACs counter counts the widths AMAP chose, not the pads (as an export's `macs`)
    out["counted"] = {
        name: a.replace(token_points=points)
        for name, a in (("asvit", dense), ("amap+asvit", p_arch))
    }
    for name, arch, seed in (("asvit", dense, 1), ("amap+asvit", padded["arch"], 2)):
        model, params = token_model(arch, points, images, fractions, seed)
        out[name] = (model, params, kept(model, params, images))
    channels = {"dense": out["dense"]} | {
        name: (out[name][0].arch, out[name][1]) for name in ("asvit", "amap+asvit")
    }
    out["kernels"] = {
        name: common.kernel_set(*untokened(*c), max(_batch_sizes()), common.KERNELS.value)
        for name, c in channels.items()
    }
    return out


def _batch_sizes() -> list[int]:
    return [int(v) for v in _BATCHES.value]


def pad_widths(arch, params) -> dict:
    """AMAP's widths as the pipeline exports them (`export_pad`, `--token_pad`): {"arch": the
    padded architecture, "choice": what was chosen, "gains": the measured options}."""
    from amap_jax import export_speed
    from amap_jax.pruning import padding

    report = {"choice": f"x{_PAD.value}" if _PAD.value > 1 else "unpadded", "gains": {}}
    multiple = _PAD.value
    if multiple == 0:
        multiple, report = export_speed.measured(arch, params, max(_batch_sizes()))
    padded, _ = padding.pad(arch, params, multiple)
    return {"arch": padded, "choice": report["choice"], "gains": report["gains"]}


def untokened(arch, params):
    """(arch, params) of a model's channels alone, all tokens kept: what its CPU kernel set is
    measured on (`common.kernel_set`), as the pipeline measures an export's."""
    if not arch.token_points:
        return arch, params
    return arch.replace(token_points=()), {k: v for k, v in params.items() if k != "token_gate"}


def bucket_costs(model, params, counts, dense_arch) -> list[dict]:
    """Per bucket set: compile time of the one-program forward at batch 1, forward.jax size and
    the time to write it, and the ideal at its buckets (batch 1 and each timed batch)."""
    import jax

    from amap_jax.io import artifact
    from amap_jax.models import tokens

    arch = model.arch
    x = np.zeros((1, arch.image_size, arch.image_size, arch.in_chans), np.float32)
    rows = []
    for spec in _BUCKETS.value:
        buckets = bucket_set(spec, arch.num_tokens)
        t = time.perf_counter()
        jax.jit(tokens.dropping(model, buckets)).lower({"params": params}, x).compile()
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        data = artifact.serialize(arch.replace(token_buckets=buckets), params)
        export_s = time.perf_counter() - t
        rows.append(
            {
                "buckets": spec,
                "count": len(buckets),
                "compile_s": round(compile_s, 2),
                "artifact_mb": round(len(data) / 2**20, 2),
                "export_s": round(export_s, 2),
                "ideal_at_buckets": {
                    b: round(
                        ideal(
                            dense_arch, arch, arch.token_points, counts, buckets, b, _GROUPS.value
                        ),
                        3,
                    )
                    for b in _batch_sizes()
                },
            }
        )
        print(f"buckets {spec}: {rows[-1]}")
    return rows


def jax_rounds(fns_by_batch) -> dict:
    """One alternation's jax rounds: {batch: {"images_per_s": {name: [per round]}}}."""
    return {
        b: {"images_per_s": interleaved(fns, common.SECONDS.value, common.ROUNDS.value, b)}
        for b, fns in fns_by_batch.items()
    }


def jax_functions(built) -> tuple[dict, dict]:
    """{batch: {name: call}} of every jax model, and the compile and export times."""
    import jax

    from amap_jax import models, xla_cpu
    from amap_jax.io import artifact
    from amap_jax.models import tokens

    dense, dense_params = built["dense"]
    sets = built["kernels"]
    forward = xla_cpu.jit(models.build(dense).apply, sets["dense"])
    on_device = jax.device_put({"params": dense_params})  # not copied in at every call
    calls = {
        "dense": lambda x: forward(on_device, x),
        "dense artifact": xla_cpu.jit(
            jax.export.deserialize(bytearray(artifact.serialize(dense, dense_params))).call,
            sets["dense"],
        ),
    }
    costs = {}
    for name in ("asvit", "amap+asvit"):
        model, params, _ = built[name]
        arch = model.arch.replace(
            token_buckets=bucket_set(_BUCKETS.value[0], dense.num_tokens),
            token_groups=_GROUPS.value,
        )
        model = model.clone(arch=arch)
        variables = jax.device_put({"params": params})
        drop = xla_cpu.jit(tokens.dropping(model), sets[name])
        calls[name] = lambda x, drop=drop, v=variables: drop(v, x)[0]
        if _GROUPS.value > 1:  # the same model with the whole batch at its largest count
            whole = xla_cpu.jit(tokens.dropping(model, groups=1), sets[name])
            calls[f"{name} 1 part"] = lambda x, drop=whole, v=variables: drop(v, x)[0]
        t = time.perf_counter()
        data = artifact.serialize(arch, params)
        costs[f"{name} export_s"] = round(time.perf_counter() - t, 2)
        costs[f"{name} artifact_mb"] = round(len(data) / 2**20, 2)
        calls[f"{name} artifact"] = xla_cpu.jit(
            jax.export.deserialize(bytearray(data)).call, sets[name]
        )
    fns = {}
    for b in _batch_sizes():
        batches = _batches(built["images"], b)
        fns[b] = {}
        for name, call in calls.items():
            if b == 1 and name.endswith(" 1 part"):  # batch 1 is never in parts
                continue
            t = time.perf_counter()
            jax.block_until_ready(call(batches[0]))
            costs[f"{name} b{b} compile_s"] = round(time.perf_counter() - t, 2)
            fns[b][name] = cycling(call, batches)
    return fns, costs


# -- torch side ----------------------------------------------------------------------------


def torch_worker() -> dict:
    """timm's DeiT dense and with the kept counts of `--token_counts` (per image, per point)."""
    from bench import torch_env

    torch, timm = torch_env.load()
    with open(_COUNTS.value) as f:
        counts = np.asarray(json.load(f)["counts"])
    points = tuple(int(p) for p in _POINTS.value)
    size = sides.IMAGE.value
    model = timm.create_model(sides.TIMM[sides.MODEL.value], pretrained=False, img_size=size)
    model = model.eval()

    def block_with_cls_attention(blk, x):
        """timm's Block with its attention unfused: also the class token's attention to each
        patch token, averaged over heads."""
        a = blk.attn
        b, n, _ = x.shape
        qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, a.attn_dim)
        x = x + blk.ls1(a.proj(a.norm(y)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return x, attn[:, :, 0, 1:].mean(1)

    def dropping(x, keep):
        """`keep[k]`: patch tokens kept at point k."""
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for i, blk in enumerate(model.blocks):
            if i + 1 in points:
                x, score = block_with_cls_attention(blk, x)
                idx = score.topk(int(keep[points.index(i + 1)]), dim=-1).indices
                patches = x[:, 1:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
                x = torch.cat([x[:, :1], patches], 1)
            else:
                x = blk(x)
        return model.forward_head(model.norm(x))

    gen = torch.Generator().manual_seed(0)
    out = {"torch": torch.__version__, "timm": timm.__version__, "per_batch": {}}
    for b in _batch_sizes():
        n = len(counts) // b
        xs = [torch.randn(b, 3, size, size, generator=gen) for _ in range(n)]
        ks = [counts[i * b : (i + 1) * b].max(0) for i in range(n)]
        with torch.inference_mode():
            assert dropping(xs[0], ks[0]).shape == (b, 1000)
        fns = {
            "dense": _torch_cycling(torch, lambda x, k: model(x), xs, ks),
            "asvit": _torch_cycling(torch, dropping, xs, ks),
        }
        for fn in fns.values():  # torch's first calls are slow (allocator, kernel choice)
            for _ in range(3):
                fn()
        speeds = interleaved(fns, common.SECONDS.value, common.ROUNDS.value, b)
        out["per_batch"][str(b)] = {"images_per_s": speeds}
    return out


def _torch_cycling(torch, fn, xs, ks):
    """A no-argument call that runs `fn` on the next (images, kept counts)."""
    state = {"k": 0}

    def run():
        j = state["k"] % len(xs)
        with torch.inference_mode():
            fn(xs[j], ks[j])
        state["k"] += 1

    return run


# -- the parent: jax here, torch in its own process, alternated ------------------------------


def markdown(meta: dict, rows: list[dict], buckets: list[dict]) -> str:
    lines = [
        f"{meta['model']} at {meta['image_size']} px, float32, points {meta['points']}, "
        f"kept patch tokens (mean of {meta['patches']}): asvit {meta['kept']['asvit']}, "
        f"amap+asvit {meta['kept']['amap+asvit']}; {meta['alternations']} alternations x "
        f"{meta['rounds']} rounds ({meta['device']}, {meta['cpus']} CPUs). Speedups are over "
        "the dense model run the same way: the program's over `model.apply`, the artifact's "
        "over the dense artifact, timm's over timm's dense. A batch runs in "
        f"{meta['token_groups']} parts sorted by kept count, each at its own bucket ('1 part': "
        "the whole batch at its largest count). AMAP's widths padded: "
        f"{meta['amap_padding']['choice']}; CPU kernel sets: "
        + ", ".join(f"{k} {v}" for k, v in meta["cpu_kernels"].items())
        + ".",
        "",
        "| batch | model | img/s | speedup over dense (range) | ideal | ideal at buckets "
        "| speedup / ideal | over timm asvit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['model']} | {r['img_s']:.1f} | {r['speedup']:.2f}x "
            f"({r['range'][0]:.2f}-{r['range'][1]:.2f}) | {_x(r.get('ideal'))} "
            f"| {_x(r.get('ideal_at_buckets'))} | {_r(r.get('efficiency'))} "
            f"| {_x(r.get('over_timm'))} |"
        )
    lines += [
        "",
        "| buckets | count | compile s (batch 1) | forward.jax MB | export s | ideal at buckets |",
        "|---|---|---|---|---|---|",
    ]
    for r in buckets:
        at = ", ".join(f"batch {b}: {v:.2f}x" for b, v in r["ideal_at_buckets"].items())
        lines.append(
            f"| {r['buckets']} | {r['count']} | {r['compile_s']:.1f} | {r['artifact_mb']:.1f} "
            f"| {r['export_s']:.1f} | {at} |"
        )
    return "\n".join(lines) + "\n"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _r(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def rows_of(runs: dict, ideals: dict) -> list[dict]:
    """One row per (batch, model): median img/s, speedup over the same framework's dense in
    the same round (median, range), the ideal beside it."""
    rows = []
    for b in _batch_sizes():
        for side in ("jax", "torch"):
            per = [r["per_batch"][str(b)] for r in runs[side]]
            if not per:
                continue
            for name in per[0]["images_per_s"]:
                label = name if side == "jax" else f"timm {name}"
                row = {"batch": b, "model": label, **summary(per, name)}
                kind = name.removesuffix(" artifact").removesuffix(" 1 part")
                if kind in ideals:
                    row["ideal"] = ideals[kind]["ideal"]
                    row["efficiency"] = round(row["speedup"] / row["ideal"], 3)
                    if side == "jax":
                        whole = name.endswith(" 1 part")
                        row["ideal_at_buckets"] = ideals[kind]["at_buckets" + whole * "_1"][b]
                rows.append(row)
    for b in _batch_sizes():  # ours over timm at the same kept tokens
        ours = [r for r in rows if r["batch"] == b and r["model"] in ("asvit", "asvit artifact")]
        timm = [r for r in rows if r["batch"] == b and r["model"] == "timm asvit"]
        for r in ours:
            if timm:
                r["over_timm"] = round(r["img_s"] / timm[0]["img_s"], 3)
    return rows


def main(_):
    if sides.WORKER.value == "torch":
        print(json.dumps(torch_worker()))
        return
    import jax

    t = time.perf_counter()
    built = setup()
    dense = built["dense"][0]
    points = built["points"]
    print(f"models and thresholds: {time.perf_counter() - t:.0f} s")
    ideals, kept_mean = {}, {}
    first = bucket_set(_BUCKETS.value[0], dense.num_tokens)
    for name in ("asvit", "amap+asvit"):
        counts, arch = built[name][2], built["counted"][name]
        kept_mean[name] = [round(float(c), 1) for c in counts.mean(0)]
        ideals[name] = {
            "ideal": round(ideal(dense, arch, points, counts), 3),
            "at_buckets": {
                b: round(ideal(dense, arch, points, counts, first, b, _GROUPS.value), 3)
                for b in _batch_sizes()
            },
            "at_buckets_1": {
                b: round(ideal(dense, arch, points, counts, first, b), 3) for b in _batch_sizes()
            },
        }
        print(f"{name}: kept {kept_mean[name]} of {dense.grid**2}, ideal {ideals[name]}")
    print(f"AMAP widths padded: {built['pad']['choice']}; CPU kernels: {built['kernels']}")
    model, params, counts = built["asvit"]
    buckets = bucket_costs(model, params, counts, dense)
    fns, costs = jax_functions(built)
    runs = {"jax": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        counts_file = os.path.join(tmp, "counts.json")
        with open(counts_file, "w") as f:
            json.dump({"counts": built["asvit"][2].tolist()}, f)
        for k in range(sides.ALTERNATIONS.value):
            t = time.perf_counter()
            runs["jax"].append({"per_batch": {str(b): v for b, v in jax_rounds(fns).items()}})
            print(f"alternation {k + 1}: jax {time.perf_counter() - t:.0f} s")
            t = time.perf_counter()
            extra = [f"--token_counts={counts_file}"]
            runs["torch"].append(sides.run_worker("bench.token_speed", "torch", extra=extra))
            print(f"alternation {k + 1}: torch {time.perf_counter() - t:.0f} s")
    rows = rows_of(runs, ideals)
    meta = {
        "model": f"{dense.name} (timm {sides.TIMM[sides.MODEL.value]})",
        "image_size": dense.image_size,
        "points": list(points),
        "fractions": [float(f) for f in _FRACTIONS.value],
        "patches": dense.grid**2,
        "kept": kept_mean,
        "images": _IMAGES.value,
        "timed_buckets": _BUCKETS.value[0],
        "token_groups": _GROUPS.value,
        "amap_padding": {k: built["pad"][k] for k in ("choice", "gains")},
        "cpu_kernels": built["kernels"],
        "rounds": common.ROUNDS.value,
        "alternations": sides.ALTERNATIONS.value,
        "seconds": common.SECONDS.value,
        "device": str(jax.devices()[0].device_kind),
        "cpus": common.cpus(),
        "costs": costs,
        "bucket_sets": buckets,
        "versions": {k: v for k, v in runs["torch"][0].items() if k != "per_batch"},
        "runs": runs,
    }
    md = markdown(meta, rows, buckets)
    path = common.write(f"token_speed{common.suffix()}", rows, meta, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.run(main)
