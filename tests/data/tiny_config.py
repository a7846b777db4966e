"""The whole pipeline on scikit-learn's 8x8 digits in well under a minute (tests, CLI tests)."""

from amap_jax.config import defaults


def get_config():
    c = defaults()
    c.data.name = "digits"
    c.model.variant = "micro"
    c.model.pattern = "LS"
    c.num_devices = 2
    c.checkpoint_every = 20
    for stage in ("train", "search", "finetune"):
        c[stage].batch_size = 64
    c.train.epochs = 2.0
    c.search.epochs = 1.0
    c.search.target = 0.6
    c.amap.calibration_batch = 16
    c.finetune.epochs = 1.0
    c.eval.batch_size = 100
    c.eval.bench_batch = 8
    c.eval.bench_seconds = 0.1
    c.export_artifact = False  # seconds per run; tested once (pipeline_test)
    return c
