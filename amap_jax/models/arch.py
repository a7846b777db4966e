"""Architecture descriptions: the one object that says how wide every block is.

A dense model and a pruned model differ only in these numbers, so the description is what an
export writes to disk and what `load_pruned` reads back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SOFTMAX = "S"
LINEAR = "L"


@dataclasses.dataclass(frozen=True)
class BlockArch:
    """Widths of one transformer block.

    `qk_dim`/`v_dim` are per head; every head has the same width (head-balanced pruning keeps it
    that way). `qk_scale` pins the softmax scale to the dense model's 1/sqrt(d) after pruning.
    `dwc_per_head` is set by export when heads keep different value channels of the shared
    depthwise conv of focused linear attention.
    """

    attn: str
    heads: int
    qk_dim: int
    v_dim: int
    mlp_dim: int
    qk_scale: float | None = None
    dwc_per_head: bool = False

    def __post_init__(self):
        if self.attn not in (SOFTMAX, LINEAR):
            raise ValueError(f"attn must be {SOFTMAX!r} or {LINEAR!r}, got {self.attn!r}")
        for name in ("heads", "qk_dim", "v_dim", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def scale(self) -> float:
        return self.qk_scale if self.qk_scale is not None else self.qk_dim**-0.5


@dataclasses.dataclass(frozen=True)
class ViTArch:
    """A ViT/DeiT (softmax) or FLatten-DeiT (focused linear attention per block)."""

    image_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    blocks: tuple[BlockArch, ...]
    focusing_factor: float = 3.0
    kernel_size: int = 5
    reweight: bool = False
    gelu_approximate: bool = False
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    name: str = ""

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (one per input channel)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1

    @property
    def pattern(self) -> str:
        return "".join(b.attn for b in self.blocks)

    def replace(self, **kw) -> ViTArch:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["type"] = "vit"
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTArch:
        d = dict(d)
        kind = d.pop("type", "vit")
        if kind != "vit":
            raise ValueError(f"not a ViT architecture: type={kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown architecture fields: {unknown}")
        d["blocks"] = tuple(BlockArch(**b) for b in d["blocks"])
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ViTArch:
        return cls.from_dict(json.loads(text))


# name: (embed_dim, depth, heads, mlp_ratio, patch, image)
_VIT_VARIANTS = {
    "Ti": (192, 12, 3, 4, 16, 224),
    "S": (384, 12, 6, 4, 16, 224),
    "B": (768, 12, 12, 4, 16, 224),
    # Small variants for 28x28 inputs (Fashion-MNIST) that train in minutes on two CPU cores.
    "mini": (64, 4, 2, 4, 7, 28),
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
) -> ViTArch:
    """Dense architecture for a named variant.

    `pattern` picks the attention kind per block, e.g. "LLLLLLSSSSSS" for a FLatten-DeiT with
    focused linear attention in the first six blocks; default all softmax.
    """
    if variant not in _VIT_VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known: {sorted(_VIT_VARIANTS)}")
    dim, depth, heads, ratio, patch, size = _VIT_VARIANTS[variant]
    pattern = pattern or SOFTMAX * depth
    if len(pattern) != depth:
        raise ValueError(f"pattern {pattern!r} has {len(pattern)} letters; {variant} has {depth}")
    head_dim = dim // heads
    blocks = tuple(BlockArch(a, heads, head_dim, head_dim, dim * ratio) for a in pattern)
    if mean is None:
        mean = (0.485, 0.456, 0.406) if in_chans == 3 else (0.5,) * in_chans
    if std is None:
        std = (0.229, 0.224, 0.225) if in_chans == 3 else (0.5,) * in_chans
    kind = "FLatten-ViT" if LINEAR in pattern else "ViT"
    return ViTArch(
        image_size=image_size or size,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=dim,
        blocks=blocks,
        mean=tuple(mean),
        std=tuple(std),
        gelu_approximate=gelu_approximate,
        name=f"{kind}-{variant}/{patch}",
    )


VARIANTS = tuple(_VIT_VARIANTS)
