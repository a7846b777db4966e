"""Architecture descriptions: the one object that says how wide every block is.

A dense model and a pruned model differ only in these numbers, so the description is what an
export writes to disk and what `load_pruned` reads back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

SOFTMAX = "S"
LINEAR = "L"


@dataclasses.dataclass(frozen=True)
class BlockArch:
    """Widths of one transformer block.

    `qk_dim`/`v_dim` are per head; every head has the same width (a method that keeps different
    counts per head is exported padded to the widest). `qk_scale` pins the softmax scale to the
    dense model's 1/sqrt(d) after pruning. `attn_in`/`mlp_in` list the residual channels that
    feed q/k/v and fc1 after input-dimension pruning (a gather of the LayerNorm output; empty:
    all of them).
    `dwc_per_head` is set by export when heads keep different value channels of the shared
    depthwise conv of focused linear attention. `window` > 0 cuts a hierarchical model's token map
    into `window` x `window` windows (softmax ones get a relative position bias), cyclically
    shifted by `shift`; 0 means one attention over all tokens.
    """

    attn: str
    heads: int
    qk_dim: int
    v_dim: int
    mlp_dim: int
    qk_scale: float | None = None
    dwc_per_head: bool = False
    window: int = 0
    shift: int = 0
    attn_in: tuple[int, ...] = ()
    mlp_in: tuple[int, ...] = ()

    def __post_init__(self):
        if self.attn not in (SOFTMAX, LINEAR):
            raise ValueError(f"attn must be {SOFTMAX!r} or {LINEAR!r}, got {self.attn!r}")
        for name in ("heads", "qk_dim", "v_dim", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shift and not 0 < self.shift < self.window:
            raise ValueError(f"shift {self.shift} must lie in (0, window={self.window})")
        for name in ("attn_in", "mlp_in"):
            idx = getattr(self, name)
            if list(idx) != sorted(set(idx)) or (idx and idx[0] < 0):
                raise ValueError(f"{name} must list distinct channels in increasing order")

    @property
    def scale(self) -> float:
        return self.qk_scale if self.qk_scale is not None else self.qk_dim**-0.5


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a block sits: what its MACs and its attention layout depend on besides widths."""

    dim: int  # residual width
    tokens: int  # tokens per image
    window_tokens: int  # tokens one attention call sees
    windows: int  # attention calls per image
    grid: int  # side of the token grid inside one attention call (depthwise conv)
    resolution: int = 0  # side of the image's token map (hierarchical models), 0 for ViT


def _block_from_dict(d: dict[str, Any]) -> BlockArch:
    d = dict(d)
    for key in ("attn_in", "mlp_in"):
        d[key] = tuple(d.get(key, ()))
    return BlockArch(**d)


@dataclasses.dataclass(frozen=True)
class _Arch:
    """The fields, JSON round trip and checks every architecture description shares, so that
    a field added for every family is declared once. `norm_eps` stays each family's own: the
    defaults differ, and ViT's fields keep their order (repr, model.json)."""

    TYPE = ""

    image_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    blocks: tuple[BlockArch, ...]
    focusing_factor: float = 3.0
    kernel_size: int = 5
    gelu_approximate: bool = False
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    name: str = ""

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "type": self.TYPE}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        kind = d.pop("type", cls.TYPE)
        if kind != cls.TYPE:
            raise ValueError(f"not a {cls.TYPE} architecture: type={kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown architecture fields: {unknown}")
        if d.pop("reweight", False):  # exports before methods owned the reweight scales
            raise ValueError("architectures with reweight scales are search-time only")
        d["blocks"] = tuple(_block_from_dict(b) for b in d["blocks"])
        if d.get("token_points") and "token_head_weight" not in d:
            d["token_head_weight"] = "residual"  # token exports made before the field
        for key in ("mean", "std", "depths", "token_points", "token_buckets"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    @property
    def pattern(self) -> str:
        return "".join(b.attn for b in self.blocks)

    def _check_inputs(self):
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (one per input channel)")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )


@dataclasses.dataclass(frozen=True)
class ViTArch(_Arch):
    """A ViT/DeiT (softmax) or FLatten-DeiT (focused linear attention per block).

    `distilled` adds DeiT's distillation token and head; the logits are the mean of both heads.
    `token_points`: adaptive token dropping (an exported AS-ViT model), with the token counts
    its dropping forward is compiled for, `token_buckets`, and the parts a batch runs in,
    `token_groups`.
    """

    TYPE = "vit"

    distilled: bool = False
    norm_eps: float = 1e-6
    # Blocks before which tokens under a learnt threshold are dropped (models.tokens).
    token_points: tuple[int, ...] = ()
    # Token counts the segments after a point are compiled for (models.tokens.buckets_of;
    # (): multiples of 8 and the full count).
    token_buckets: tuple[int, ...] = ()
    # Parts a batch runs in after each point, sorted by kept count (models.tokens.dropping;
    # 0 until an export measures it, then as 1).
    token_groups: int = 1
    # How token scores weight each head (`models.attention.Attention.head_weight`): "value"
    # (before the output projection, AS-ViT's official code) or "residual" (after it).
    token_head_weight: str = "value"

    def __post_init__(self):
        self._check_inputs()
        if self.token_head_weight not in ("value", "residual"):
            raise ValueError(
                f"token_head_weight must be 'value' or 'residual', got {self.token_head_weight!r}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + self.num_prefix

    def geometry(self) -> list[Geometry]:
        n = self.num_tokens
        return [Geometry(self.embed_dim, n, n, 1, self.grid)] * len(self.blocks)


@dataclasses.dataclass(frozen=True)
class SwinArch(_Arch):
    """A Swin or FLatten-Swin: stages of blocks at halving resolution, joined by patch merging.

    `blocks` lists every block of every stage in order (`depths` says how many per stage); stage s
    has width embed_dim * 2**s and a token map of side image_size / patch_size / 2**s.
    """

    TYPE = "swin"

    norm_eps: float = 1e-5
    # Swin drops no tokens (models.tokens is for ViT/DeiT): the same attribute as ViTArch's
    # field, so that code asks `arch.token_points` of any architecture.
    token_points: ClassVar[tuple[int, ...]] = ()
    # Keyword-only: after the base's defaulted fields it cannot be positional.
    depths: tuple[int, ...] = dataclasses.field(kw_only=True)

    def __post_init__(self):
        self._check_inputs()
        if sum(self.depths) != len(self.blocks):
            raise ValueError(
                f"depths {self.depths} sum to {sum(self.depths)}, not {len(self.blocks)} blocks"
            )
        for s in range(len(self.depths)):
            r = self.resolution(s)
            if s < len(self.depths) - 1 and r % 2:
                raise ValueError(f"stage {s} token map {r}x{r} cannot be merged 2x2 (odd side)")
        for i, (b, s) in enumerate(zip(self.blocks, self.stages(), strict=True)):
            r = self.resolution(s)
            if not b.window or r % b.window:
                raise ValueError(f"block {i}: window {b.window} does not tile the {r}x{r} map")

    def stages(self) -> list[int]:
        """Stage index of every block."""
        return [s for s, d in enumerate(self.depths) for _ in range(d)]

    def stage_dim(self, s: int) -> int:
        return self.embed_dim * 2**s

    def resolution(self, s: int) -> int:
        return self.image_size // self.patch_size // 2**s

    def geometry(self) -> list[Geometry]:
        out = []
        for b, s in zip(self.blocks, self.stages(), strict=True):
            r = self.resolution(s)
            out.append(
                Geometry(self.stage_dim(s), r * r, b.window**2, (r // b.window) ** 2, b.window, r)
            )
        return out

    @property
    def num_features(self) -> int:
        return self.stage_dim(len(self.depths) - 1)


Arch = ViTArch | SwinArch  # what every model, MACs count, search and export take


def arch_from_dict(d: dict[str, Any]) -> Arch:
    kinds = {c.TYPE: c for c in (ViTArch, SwinArch)}
    kind = d.get("type", ViTArch.TYPE)
    if kind not in kinds:
        raise ValueError(f"unknown architecture type {kind!r}; known: {sorted(kinds)}")
    return kinds[kind].from_dict(d)


def _default_stats(in_chans, mean, std):
    if mean is None:
        mean = (0.485, 0.456, 0.406) if in_chans == 3 else (0.5,) * in_chans
    if std is None:
        std = (0.229, 0.224, 0.225) if in_chans == 3 else (0.5,) * in_chans
    return tuple(mean), tuple(std)


# name: (embed_dim, depth, heads, mlp_ratio, patch, image)
_VIT_VARIANTS = {
    "Ti": (192, 12, 3, 4, 16, 224),
    "S": (384, 12, 6, 4, 16, 224),
    "B": (768, 12, 12, 4, 16, 224),
    # Small variants for 28x28 inputs (Fashion-MNIST) that train in minutes on two CPU cores.
    "mini": (64, 4, 2, 4, 7, 28),
    "mini4": (64, 4, 4, 4, 7, 28),  # 4 heads of 16: where head balancing matters
    "micro": (32, 2, 2, 2, 4, 28),
}


def vit_arch(
    variant: str,
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    pattern: str | None = None,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    gelu_approximate: bool = False,
    distilled: bool = False,
    patch_size: int | None = None,
) -> ViTArch:
    """Dense architecture for a named variant.

    `pattern` picks the attention kind per block, e.g. "LLLLLLSSSSSS" for a FLatten-DeiT with
    focused linear attention in the first six blocks; default all softmax.
    """
    if variant not in _VIT_VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known: {sorted(_VIT_VARIANTS)}")
    dim, depth, heads, ratio, patch, size = _VIT_VARIANTS[variant]
    patch = patch_size or patch
    pattern = pattern or SOFTMAX * depth
    if len(pattern) != depth:
        raise ValueError(f"pattern {pattern!r} has {len(pattern)} letters; {variant} has {depth}")
    head_dim = dim // heads
    blocks = tuple(BlockArch(a, heads, head_dim, head_dim, dim * ratio) for a in pattern)
    mean, std = _default_stats(in_chans, mean, std)
    kind = "FLatten-ViT" if LINEAR in pattern else ("DeiT-distilled" if distilled else "ViT")
    return ViTArch(
        image_size=image_size or size,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=dim,
        blocks=blocks,
        mean=mean,
        std=std,
        gelu_approximate=gelu_approximate,
        name=f"{kind}-{variant}/{patch}",
        distilled=distilled,
    )


# name: (embed_dim, depths, heads per stage, patch, image, window)
_SWIN_VARIANTS = {
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24), 4, 224, 7),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24), 4, 224, 7),
    "B": (128, (2, 2, 18, 2), (4, 8, 16, 32), 4, 224, 7),
    # For tests: 32x32 inputs, maps 16/8/4/2, shifted windows in stages 1-2.
    "micro": (16, (2, 2, 2, 2), (2, 2, 4, 4), 2, 32, 4),
}


def swin_arch(
    variant: str,
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    pattern: str = "SSSS",
    image_size: int | None = None,
    window: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    gelu_approximate: bool = False,
) -> SwinArch:
    """Dense Swin ("SSSS") or FLatten-Swin ("LLSS") architecture; `pattern` has one letter per
    stage. Linear stages attend over their whole token map (one window, no shift); softmax stages
    use shifted windows, shrunk to the map (and unshifted) where the map is no larger."""
    if variant not in _SWIN_VARIANTS:
        raise ValueError(f"unknown Swin variant {variant!r}; known: {sorted(_SWIN_VARIANTS)}")
    dim, depths, heads, patch, size, win = _SWIN_VARIANTS[variant]
    window = window or win
    image_size = image_size or size
    if len(pattern) != len(depths) or set(pattern) - {SOFTMAX, LINEAR}:
        raise ValueError(f"pattern {pattern!r} needs one of S/L per stage ({len(depths)} stages)")
    blocks = []
    for s, (depth, h, kind) in enumerate(zip(depths, heads, pattern, strict=True)):
        width, r = dim * 2**s, image_size // patch // 2**s
        for j in range(depth):
            if kind == LINEAR or r <= window:
                w, shift = r, 0
            else:
                w, shift = window, (window // 2 if j % 2 else 0)
            blocks.append(
                BlockArch(kind, h, width // h, width // h, 4 * width, window=w, shift=shift)
            )
    mean, std = _default_stats(in_chans, mean, std)
    kind = "FLatten-Swin" if LINEAR in pattern else "Swin"
    return SwinArch(
        image_size=image_size,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=dim,
        depths=depths,
        blocks=tuple(blocks),
        mean=mean,
        std=std,
        gelu_approximate=gelu_approximate,
        name=f"{kind}-{variant}",
    )


VARIANTS = tuple(_VIT_VARIANTS)
SWIN_VARIANTS = tuple(_SWIN_VARIANTS)
