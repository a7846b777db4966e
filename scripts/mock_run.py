"""A whole run on tfds mock data: checks a config end to end where the real data set is absent.

  python scripts/mock_run.py --config configs/imagenet_amap.py:flatten_swin_t \
      --workdir /tmp/smoke --num_examples 16 --config.model.checkpoint=flatten_swin_t.pth

Every tfds data set the config names is replaced by `num_examples` random examples
(`tfds.testing.mock_data`); the accuracies mean nothing, the plumbing is what is checked.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory.")
_NUM = flags.DEFINE_integer("num_examples", 16, "Mock examples per split.")
flags.mark_flags_as_required(["config", "workdir"])


def main(_):
    import tensorflow_datasets as tfds
    from absl import logging

    from amap_jax import logs, pipeline

    logging.set_verbosity(logging.WARNING)  # as train.py: library INFO chatter off
    logs.setup()
    with tfds.testing.mock_data(num_examples=_NUM.value):
        summary = pipeline.run(_CONFIG.value, _WORKDIR.value)
    print(pipeline.format_summary(summary))


if __name__ == "__main__":
    app.run(main)
