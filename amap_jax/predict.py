"""Top-5 labels of images from an exported model, as JSON lines.

  python -m amap_jax.predict --export EXPORT IMAGE_OR_FOLDER...

Images are read with Pillow, converted to the model's channels, resized (bilinear) to its input
size and normalised with the mean and std stored in EXPORT/model.json. The forward pass is the
export's `forward.jax` artifact when there is one, else `load_pruned`'s model, compiled with the
CPU kernel set the export names (`amap_jax.io.pruned.forward`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

from amap_jax.io import pruned

_EXPORT = flags.DEFINE_string("export", None, "An export directory (holds model.json).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
_TOP = flags.DEFINE_integer("top", 5, "Labels per image.")
flags.mark_flags_as_required(["export"])

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image file that cannot be read."""


def image_paths(items: list[str]) -> list[str]:
    """Files as given; folders expanded to their image files (sorted, not recursive)."""
    out = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(SUFFIXES)
            )
            if not found:
                raise ImageError(f"{item}: no image files ({', '.join(SUFFIXES)})")
            out += found
        elif os.path.exists(item):
            out.append(item)
        else:
            raise ImageError(f"{item}: no such file or folder")
    return out


def read_image(path: str, meta: dict) -> np.ndarray:
    """[H, W, C] float32, as the model takes it."""
    from PIL import Image, UnidentifiedImageError

    spec = meta["input"]
    size, channels = spec["image_size"], spec["channels"]
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            x = np.asarray(img, np.float32).reshape(size, size, channels) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    return (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)


def predict(directory: str, items: list[str], batch_size: int = 64, top: int = 5):
    """Yields {"image", "top": [[label, probability], ...]} per image, and "names" (the top
    labels' class names) when the export holds them."""
    meta = pruned.read_meta(directory)
    names = meta.get("class_names")
    paths = image_paths(items)
    forward = pruned.forward(directory)
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
    if len(argv) < 2:
        print("error: give image files or folders after the flags", file=sys.stderr)
        return 2
    try:
        for row in predict(_EXPORT.value, argv[1:], _BATCH.value, _TOP.value):
            print(json.dumps(row), flush=True)
    except (ImageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
