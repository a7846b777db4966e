"""amap_jax: automatic structured pruning of vision transformers in JAX/Flax."""

from amap_jax.io.pruned import load_pruned, save_pruned
from amap_jax.models.arch import BlockArch, ViTArch, vit_arch
from amap_jax.models.vit import ViT
from amap_jax.pruning.export import export
from amap_jax.pruning.projection import PruneSpec

__all__ = [
    "BlockArch",
    "PruneSpec",
    "ViT",
    "ViTArch",
    "export",
    "load_pruned",
    "save_pruned",
    "vit_arch",
]
