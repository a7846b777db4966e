"""AMAP on a small softmax ViT (4 blocks, 4 heads of 16), Fashion-MNIST (offline default): 30%
fewer MACs."""

from amap_jax.config import defaults


def get_config():
    c = defaults()
    c.model.variant = "mini4"
    c.model.pattern = "SSSS"
    # A short search and fine-tuning: the regime where the channels chosen still show
    # (bench/compare.py runs every method with this schedule).
    c.search.epochs = 0.5
    c.finetune.epochs = 2.0
    return c
