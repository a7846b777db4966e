"""AMAP on a small FLatten ViT (focused linear attention in the first two of 4 blocks, 4 heads of
16), Fashion-MNIST."""

from amap_jax.config import defaults


def get_config():
    c = defaults()
    c.model.variant = "mini4"
    c.model.pattern = "LLSS"
    # A short search and fine-tuning: the regime where the channels chosen still show
    # (bench/compare.py runs every method with this schedule).
    c.search.epochs = 0.5
    c.finetune.epochs = 2.0
    return c
