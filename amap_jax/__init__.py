"""amap_jax: automatic structured pruning of vision transformers in JAX/Flax."""

from amap_jax import methods
from amap_jax.io.pretrained import CheckpointMismatchError, import_pretrained
from amap_jax.io.pruned import load_pruned, save_pruned
from amap_jax.methods import Amap, Method, Vtp
from amap_jax.models import Swin, ViT, build
from amap_jax.models.arch import BlockArch, SwinArch, ViTArch, swin_arch, vit_arch
from amap_jax.pruning.export import export

__all__ = [
    "Amap",
    "BlockArch",
    "CheckpointMismatchError",
    "Method",
    "Swin",
    "SwinArch",
    "ViT",
    "ViTArch",
    "Vtp",
    "build",
    "export",
    "import_pretrained",
    "load_pruned",
    "methods",
    "save_pruned",
    "swin_arch",
    "vit_arch",
]
