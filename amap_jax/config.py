"""Defaults for every run, and the checks that turn a bad config into one clear line."""

from __future__ import annotations

import math
import os

import ml_collections

from amap_jax import methods
from amap_jax.pruning import cost


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "amap"  # one of amap_jax.methods.names()
    c.method_widths_from = ""  # magnitude/random: copy per-layer widths from this run's export
    c.seed = 0
    c.num_devices = 0  # 0: all visible devices
    c.parallel = "jit"  # or "pmap": the same numbers with jax.pmap and replicated state
    # Exported widths zero-padded up to a multiple (same logits, maybe faster matmuls): 1 = no
    # padding, N = a multiple of N, 0 = per block, the attention and MLP multiples measured
    # fastest on this backend for each layer shape, kept if the whole model gains from them
    # (measurements cached in ~/.cache/amap_jax/padding.json).
    c.export_pad = 1
    # CPU kernel set the export and the summary's speeds are compiled with (`amap_jax.xla_cpu`):
    # "default", "ynn_reduce", "xla", or "measure" (each model timed under every usable set, fastest
    # kept, cached like the padding). Ignored off CPU.
    c.cpu_kernels = "default"
    c.export_artifact = True  # EXPORT/forward.jax: the pruned model for jax alone (jax.export)
    c.checkpoint_every = 200  # steps
    c.scalars_every = 50  # steps between TensorBoard / scalars.jsonl writes (running means)
    c.export_dir = ""  # default: WORKDIR/export
    c.reference = ""  # published numbers to compare with, printed beside the results

    c.data = dict(
        name="fashion_mnist",
        data_dir="",
        # Defaults are chosen on `val_split`, carved from the training data (Fashion-MNIST: the
        # last 6k of 60k, fixed); `test_split` is read only to report. "" = no validation split.
        train_split="train[:90%]",
        val_split="train[90%:]",
        test_split="test",
        # Off by default: at a few epochs, shifting 7x7 patches slows learning more than it helps
        # (2 epochs, ViT-mini/7 on Fashion-MNIST: 83.5% without, 74.7% with crop 2 + flip).
        crop_padding=0,
        flip=False,
        # ImageNet-style data (imagenet2012, or a JPEG tree ROOT/<split>/<class>/*.jpeg):
        image_folder="",
        image_size=0,  # 0: the data set's own size (224 for recipe data sets)
        # The DeiT/Swin recipe; used by recipe data sets only (see data.imagenet.Recipe).
        recipe=dict(
            random_crop=True,
            flip=True,
            randaugment_ops=2,
            randaugment_magnitude=9.0,
            randaugment_std=0.5,
            erasing_prob=0.25,
            eval_crop_fraction=0.875,
        ),
        # Batch mixing on device, for every training stage (0: off).
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        mix_prob=1.0,
        mix_switch_prob=0.5,
    )
    c.model = dict(
        family="vit",  # or "swin"
        variant="mini",  # ViT: Ti/S/B/mini/micro; Swin: T/S/B/micro
        pattern="",  # attention kind per block (ViT) or per stage (Swin), e.g. "LLSS"
        patch_size=0,  # ViT: 0 = the variant's
        gelu_approximate=True,
        # A published architecture (io.pretrained.NAMES) instead of family/variant/pattern:
        name="",
        # Pretrained weights (.safetensors / .pth / .pt) for the dense model, timm or official
        # FLatten layout; with train.epochs=0 the dense stage is the import alone.
        checkpoint="",
        dtype="float32",  # or "bfloat16": compute dtype (parameters stay float32)
        # Token pruning's per-(head, token) weight: "value", the norm of the head's attention
        # output before the output projection (AS-ViT's official code), or "residual", after it.
        token_head_weight="value",
    )

    c.train = dict(
        epochs=8.0,
        batch_size=256,
        lr=2e-3,
        warmup_epochs=0.5,
        weight_decay=0.05,
        label_smoothing=0.1,
        grad_clip=1.0,
    )
    # The search stage of every method: its weights' schedule, the MACs target, distillation.
    c.search = dict(
        epochs=1.0,
        batch_size=256,
        lr=5e-4,  # weights (and a method's scales in params) while searching
        warmup_epochs=0.1,
        weight_decay=0.05,
        label_smoothing=0.1,
        grad_clip=1.0,
        target=0.7,  # cost(pruned) / cost(dense), the cost being `budget_kind`'s
        # "macs": multiply-adds; "latency": seconds per batch of `latency_batch` in the run's
        # dtype on its backend, as a latency model measured there predicts them (the summary
        # also times the export against the dense model).
        budget_kind="macs",
        latency_batch=1,  # the batch size a latency target is measured and timed at
        # A run whose export (padding included) lands further than this from `target` ends
        # with exit 4 (export and summary kept); `latency_tolerance` for a latency target, as
        # timed against the dense model (a timed ratio carries the machine's noise).
        target_tolerance=0.02,
        latency_tolerance=0.05,  # target_tolerance of a latency target, on the timed ratio
        # Distillation from the dense model while searching, for every method alike: AS-ViT's
        # paper and code train with it (weight 0.5), and the methods compare on one objective.
        kd_weight=0.5,
        kd_temperature=1.0,
    )
    # Each method's own settings (defaults and meaning: amap_jax/methods/).
    for name, settings in methods.default_sections().items():
        c[name] = settings
    c.finetune = dict(
        epochs=3.0,
        batch_size=256,
        lr=1e-3,
        warmup_epochs=0.2,
        weight_decay=0.05,
        label_smoothing=0.1,
        grad_clip=1.0,
        kd_weight=0.5,
        kd_temperature=1.0,
    )
    c.eval = dict(batch_size=500, bench_batch=256, bench_seconds=3.0)
    return c


def homes(key: str) -> list[str]:
    """The sections that have a setting called `key`."""
    return [
        s for s, v in defaults().items() if isinstance(v, ml_collections.ConfigDict) and key in v
    ]


# Sections renamed since: the old name is refused with the new one, and work directories made
# under the old names resume (`workdir`).
RENAMED = {"floor": "baseline", "compose": "amap_asvit"}


def renamed(path: str) -> str | None:
    """`path` (`section.key...`) under its section's new name, where the section was renamed."""
    section, dot, rest = path.partition(".")
    return f"{RENAMED[section]}{dot}{rest}" if section in RENAMED else None


def _unknown_keys(c: ml_collections.ConfigDict) -> None:
    """A key the defaults do not have (typed into a config file) names where it belongs."""
    ref = defaults()
    for section, value in c.items():
        if section in RENAMED:
            new = RENAMED[section]
            raise ValueError(f"unknown config key {section!r}: it is called {new!r} now")
        if section not in ref:
            raise ValueError(f"unknown config key {section!r}")
        if not isinstance(value, ml_collections.ConfigDict):
            continue
        for key in value:
            if key not in ref[section]:
                where = f"; it is a setting of {', '.join(homes(key))}" if homes(key) else ""
                raise ValueError(f"{section}.{key} is not a setting of {section}{where}")


INF = float("inf")
# key: (low, high, low excluded); "*" is every training stage (train, search, finetune).
_RANGES = {
    "*.epochs": (0, INF, False),
    "*.batch_size": (1, INF, False),
    "*.lr": (0, INF, True),
    "*.warmup_epochs": (0, INF, False),
    "*.weight_decay": (0, INF, False),
    "*.label_smoothing": (0, 1, False),
    "*.grad_clip": (0, INF, False),
    "search.kd_weight": (0, 1, False),
    "finetune.kd_weight": (0, 1, False),
    "search.kd_temperature": (0, INF, True),
    "finetune.kd_temperature": (0, INF, True),
    "search.target_tolerance": (0, 1, False),
    "search.latency_batch": (1, INF, False),
    "search.latency_tolerance": (0, 1, False),
    "eval.batch_size": (1, INF, False),
    "eval.bench_batch": (1, INF, False),
    "eval.bench_seconds": (0, INF, False),
    "data.crop_padding": (0, INF, False),
    "data.image_size": (0, INF, False),
    "data.mixup_alpha": (0, INF, False),
    "data.cutmix_alpha": (0, INF, False),
    "data.mix_prob": (0, 1, False),
    "data.mix_switch_prob": (0, 1, False),
}


def _leaves(node, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError with one line for the first thing wrong."""
    _unknown_keys(c)
    for key, value in _leaves(c):  # no setting means anything at nan or infinity
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")
    if c.seed < 0:
        raise ValueError(f"seed must be >= 0, got {c.seed}")
    t = c.search.target
    if not 0.0 < t <= 1.0:
        raise ValueError(f"search.target must be in (0, 1] (share of the cost kept), got {t}")
    if c.search.budget_kind not in cost.KINDS:
        raise ValueError(
            f"search.budget_kind must be one of {', '.join(cost.KINDS)}, "
            f"got {c.search.budget_kind!r}"
        )
    if c.search.budget_kind == "latency" and not methods.get(c.method).takes_latency:
        raise ValueError(
            f"search.budget_kind=latency: {c.method} prunes tokens per image, which the latency "
            "model does not cover; use budget_kind=macs"
        )
    for key, (low, high, low_open) in _RANGES.items():
        section, _, leaf = key.rpartition(".")
        for name in (section,) if section != "*" else ("train", "search", "finetune"):
            value = c[name][leaf]
            if value is None or value < low or (low_open and value == low) or value > high:
                bracket = "(" if low_open else "["
                raise ValueError(f"{name}.{leaf} must be in {bracket}{low}, {high}], got {value}")
    methods.from_config(c)  # the method checks its own section
    if c.method_widths_from and not methods.get(c.method).takes_widths:
        takers = [n for n in methods.names() if methods.get(n).takes_widths]
        raise ValueError(f"method_widths_from is for {'/'.join(takers)}, not {c.method!r}")
    m = c.model
    if m.family not in ("vit", "swin"):
        raise ValueError(f"model.family must be 'vit' or 'swin', got {m.family!r}")
    if m.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {m.dtype!r}")
    if m.token_head_weight not in ("value", "residual"):
        raise ValueError(
            f"model.token_head_weight must be 'value' or 'residual', got {m.token_head_weight!r}"
        )
    if m.name:
        from amap_jax.io.pretrained import NAMES

        if m.name not in NAMES:
            raise ValueError(f"model.name {m.name!r} is not one of {', '.join(NAMES)}")
        if c.train.epochs == 0 and not m.checkpoint:
            raise ValueError(
                f"{m.name} with train.epochs=0 needs pretrained weights: --config.model.checkpoint"
            )
    if m.checkpoint and not os.path.exists(m.checkpoint):
        raise FileNotFoundError(f"model.checkpoint {m.checkpoint} does not exist")
    if c.export_pad < 0:
        raise ValueError(f"export_pad must be >= 0 (0: measured), got {c.export_pad}")
    if c.cpu_kernels != "measure":
        from amap_jax import xla_cpu

        if c.cpu_kernels not in xla_cpu.SETS:
            raise ValueError(
                f"cpu_kernels must be one of {', '.join(xla_cpu.SETS)} or 'measure', "
                f"got {c.cpu_kernels!r}"
            )
    if c.num_devices < 0:
        raise ValueError(f"num_devices must be >= 0 (0: all visible devices), got {c.num_devices}")
    for key in ("checkpoint_every", "scalars_every"):
        if c[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {c[key]}")
