"""Top-5 labels of images from an exported model, as JSON lines.

  python -m amap_jax.predict --export EXPORT IMAGE_OR_FOLDER...

Images are read with Pillow (`amap_jax.io.images`), converted to the model's channels, scaled
by their bit depth, resized (bilinear) to its input size and normalised with the mean and std
stored in EXPORT/model.json. The forward pass is the
export's `forward.jax` artifact when there is one, else `load_pruned`'s model, compiled with the
CPU kernel set the export names (`amap_jax.io.pruned.forward`).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import app, flags

from amap_jax import cli, logs
from amap_jax.io import pruned
from amap_jax.io.images import ImageError, image_paths, read_image

_EXPORT = flags.DEFINE_string("export", None, "An export directory (holds model.json).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", lower_bound=1)
_TOP = flags.DEFINE_integer("top", 5, "Labels per image.", lower_bound=1)
_UNVERIFIED = flags.DEFINE_bool(
    "allow_unverified", False, "Run an export whose files have no manifest to be checked against."
)
flags.mark_flags_as_required(["export"])


def predict(
    directory: str,
    items: list[str],
    batch_size: int = 64,
    top: int = 5,
    allow_unverified: bool = False,
):
    """Yields {"image", "top": [[label, probability], ...]} per image, and "names" (the top
    labels' class names) when the export holds them."""
    meta = pruned.read_meta(directory, allow_unverified)
    names = meta.get("class_names")
    paths = image_paths(items)
    forward = pruned.forward(directory, allow_unverified)
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        logits = np.asarray(forward(np.stack([read_image(p, meta) for p in chunk])))
        z = logits - logits.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        for path, p in zip(chunk, probs, strict=True):
            order = np.argsort(-p)[:top]
            row = {"image": path, "top": [[int(k), round(float(p[k]), 5)] for k in order]}
            if names:
                row["names"] = [names[k] for k in order]
            yield row


def main(argv):
    logs.quiet_libraries()  # no "Unable to initialize backend 'tpu'" on a CPU
    if len(argv) < 2:
        print("error: give image files or folders after the flags", file=sys.stderr)
        return 2
    try:
        for row in predict(_EXPORT.value, argv[1:], _BATCH.value, _TOP.value, _UNVERIFIED.value):
            print(json.dumps(row), flush=True)
    except (ImageError, FileNotFoundError, ValueError, pruned.trees.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
