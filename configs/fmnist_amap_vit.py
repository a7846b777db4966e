"""AMAP on a small softmax ViT, Fashion-MNIST (offline default): 30% fewer MACs."""

from amap_jax.config import defaults


def get_config():
    c = defaults()
    c.model.variant = "mini"
    c.model.pattern = "SSSS"
    c.amap.init = "constant"  # attention-difference init is for linear attention
    return c
