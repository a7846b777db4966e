"""Runs a pruning experiment: train -> search -> export -> finetune -> eval.

  python train.py --config configs/fmnist_amap_vit.py --workdir /tmp/run \
      [--config.search.target=0.6 ...]
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (checkpoints, export, summary).")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _parse(argv):
    """absl's parser, with a one-line error instead of a traceback for a bad override."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        text = str(e).replace("\\", "")
        found = re.search(r"'([^']+)'", text)
        key = found.group(1) if found else text.splitlines()[0]
        hint = re.search(r'Did you mean "([^"]+)"', text)
        bad = [a for a in argv if a.startswith("--config.") and key in a]
        where = " ".join(bad) or "the overrides"
        from amap_jax import config as config_lib

        homes = [
            f"--config.{name}.{key}"
            for name, section in config_lib.defaults().items()
            if hasattr(section, "keys") and key in section
        ]
        if homes:
            hint_text = f" (it is a setting of {' / '.join(homes)})"
        else:
            hint_text = f" (did you mean {hint.group(1)!r}?)" if hint else ""
        _fail(f"unknown config key {key!r} in {where}{hint_text}")
    except (flags.Error, ValueError, TypeError) as e:
        _fail(str(e).splitlines()[0])


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from amap_jax import logs, pipeline

    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter out of the run log
    logs.setup()
    try:
        summary = pipeline.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, ImportError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(pipeline.format_summary(summary))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
