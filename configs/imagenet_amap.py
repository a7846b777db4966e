"""AMAP on ImageNet-1K from pretrained weights: the paper's runs at 30% fewer MACs.

  python train.py --config configs/imagenet_amap.py:flatten_swin_t --workdir RUN \
      --config.model.checkpoint=flatten_swin_t.pth --config.data.data_dir=TFDS_DIR

Models: flatten_swin_t, flatten_swin_s, flatten_swin_b, deit_s, deit_b. The checkpoint is the
official FLatten-Transformer release (weights under "model") or timm's DeiT weights. Data is tfds
`imagenet2012` prepared in data_dir, or `--config.data.image_folder=ROOT` with
ROOT/{train,validation}/<class>/*.jpeg. The dense stage is the import (train.epochs=0), then the
search, export and a distilled fine-tune with the DeiT/Swin recipe.

Schedules are ours (the AMAP paper's full text, with its schedule, was not available): a short
indicator search, then fine-tuning as long as budgets allow. `reference` holds the published
numbers to compare with; the summary prints it beside the results.
"""

from amap_jax.config import defaults

# name: (published architecture, reference numbers: dense from the model's paper; AMAP's claim)
MODELS = {
    "flatten_swin_t": (
        "flatten_swin_tiny_patch4_224",
        "FLatten-Swin-T dense 82.1% at 4.5 GMACs (Han et al. 2023); "
        "AMAP: ~30% fewer MACs, near lossless",
    ),
    "flatten_swin_s": (
        "flatten_swin_small_patch4_224",
        "FLatten-Swin-S dense 83.5% at 8.7 GMACs (Han et al. 2023); "
        "AMAP: ~30% fewer MACs, near lossless",
    ),
    "flatten_swin_b": (
        "flatten_swin_base_patch4_224",
        "FLatten-Swin-B dense 83.8% at 15.4 GMACs (Han et al. 2023); "
        "AMAP: ~30% fewer MACs, near lossless",
    ),
    "deit_s": (
        "deit_small_patch16_224",
        "DeiT-S dense 79.8% at 4.6 GMACs (Touvron et al. 2021)",
    ),
    "deit_b": (
        "deit_base_patch16_224",
        "DeiT-B dense 81.8% at 17.6 GMACs (Touvron et al. 2021); "
        "AMAP: +1.96 top-1 over DeiT-B at 37% fewer MACs",
    ),
}


def get_config(model: str = "flatten_swin_t"):
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
    name, reference = MODELS[model]
    c = defaults()
    c.reference = reference
    c.checkpoint_every = 1000

    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.val_split = ""  # ImageNet's validation split is the reported (test) one
    c.data.test_split = "validation"
    c.data.image_size = 224
    c.data.mixup_alpha = 0.8
    c.data.cutmix_alpha = 1.0

    c.model.name = name
    c.model.gelu_approximate = False  # as pretrained
    c.model.dtype = "bfloat16"

    c.train.epochs = 0.0  # the dense model is the imported one

    c.search.epochs = 5.0
    c.search.batch_size = 1024
    c.search.lr = 5e-5
    c.amap.indicator_lr = 0.02
    c.search.warmup_epochs = 0.5
    c.search.target = 0.7
    c.amap.multiple = 8  # kept widths in multiples of 8: friendlier to TPU/GPU matmuls
    # The paper's initialisation: attention differences of the linear blocks only (measuring
    # every softmax channel too, output_diff, costs one attention pass per channel).
    c.amap.init = "attn_diff"
    c.amap.min_keep_fraction = 0.25
    c.amap.calibration_batch = 64
    c.search.kd_weight = 0.5
    c.amap.similarity_every = 500

    c.finetune.epochs = 30.0
    c.finetune.batch_size = 1024
    c.finetune.lr = 1e-4
    c.finetune.warmup_epochs = 2.0
    c.finetune.kd_weight = 0.5

    c.eval.batch_size = 1000
    c.eval.bench_batch = 64
    return c
