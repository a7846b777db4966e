"""Token pruning (AS-ViT, AMAP+AS-ViT) on Fashion-MNIST with 4 px patches: 49 patch tokens per
image (patch 7 gives 16, too few for token pruning to matter). DeiT-S's 197 tokens are timed in
bench/token_speed.py."""

from amap_jax.config import defaults


def get_config():
    c = defaults()
    c.method = "asvit"
    c.model.variant = "mini4"
    c.model.patch_size = 4
    c.model.pattern = "SSSS"
    c.eval.bench_batch = 64
    # A short search and fine-tuning: the regime where the channels chosen still show
    # (bench/compare.py runs every method with this schedule).
    c.search.epochs = 0.5
    c.finetune.epochs = 2.0
    return c
