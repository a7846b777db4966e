"""AMAP on a small FLatten ViT (focused linear attention in the first half), Fashion-MNIST."""

from amap_jax.config import defaults


def get_config():
    c = defaults()
    c.model.variant = "mini"
    c.model.pattern = "LLSS"
    c.amap.init = "attn_diff"
    return c
