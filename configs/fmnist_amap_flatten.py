"""AMAP on a small FLatten ViT (focused linear attention in the first two of 4 blocks, 4 heads of
16), Fashion-MNIST."""

from amap_jax.config import defaults


def get_config():
    c = defaults()
    c.model.variant = "mini4"
    c.model.pattern = "LLSS"
    c.amap.init = "attn_diff"
    return c
