"""Image files as an exported model takes them: [H, W, C] float32, normalised as its
model.json says. Pillow reads them; a file it cannot read, or would not read safely, is one
line (`ImageError`)."""

from __future__ import annotations

import os
import warnings

import numpy as np

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


def _pixels(img, size: int, channels: int) -> np.ndarray:
    """[size, size, C] in [0, 1], scaled by the image's own bit depth (a 16-bit PNG is not
    clipped to 8 bits), resized bilinearly."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        grey = img.convert("F")  # exact for 16-bit values
        if grey.size != (size, size):
            grey = grey.resize((size, size), Image.BILINEAR)
        x = np.asarray(grey, np.float32) / 65535.0
        return np.repeat(x[..., None], channels, axis=-1)
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise ImageError(
            f"{kind} pixels (mode {img.mode}) have no known range; save it as an 8- or 16-bit image"
        )
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, np.float32).reshape(size, size, channels) / 255.0


def read_image(path: str, meta: dict) -> np.ndarray:
    """[H, W, C] float32, as the model takes it."""
    from PIL import Image, UnidentifiedImageError

    spec = meta["input"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                x = _pixels(img, spec["image_size"], spec["channels"])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # "Image size (N pixels) exceeds limit of M pixels, could be decompression bomb ..."
        raise ImageError(f"{path}: {str(e).split(', could')[0]}; downscale it first") from None
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    return (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
