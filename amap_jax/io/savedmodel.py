"""The exported model as a TensorFlow SavedModel, for TF Serving and other TF runtimes.

  python -m amap_jax.io.savedmodel --export EXPORT [--out EXPORT/savedmodel]

`jax2tf` with native serialization: the SavedModel holds the same StableHLO as `forward.jax`
(an `XlaCallModule` op, lowered for CPU, CUDA and TPU), weights included, batch dimension
symbolic. Signature `serving_default`: `images` float32 [N, H, W, C], normalised as
EXPORT/model.json says -> `logits` [N, classes]. Needs TensorFlow (requirements-imagenet.txt),
which nothing else at run time does.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from amap_jax import models
from amap_jax.io import artifact, paths, pruned
from amap_jax.models.arch import Arch

DIRECTORY = "savedmodel"


def write(directory: str, arch: Arch, params) -> str:
    """Writes the SavedModel to `directory` and returns it."""
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise RuntimeError(
            f"a SavedModel needs TensorFlow ({e}): pip install -r requirements-imagenet.txt"
        ) from None
    model = models.build(arch)
    params = jax.tree.map(np.asarray, params)
    forward = jax2tf.convert(
        lambda images: model.apply({"params": params}, images),
        polymorphic_shapes=["(b, _, _, _)"],
        native_serialization_platforms=artifact.PLATFORMS,
        with_gradient=False,
    )
    spec = tf.TensorSpec([None, arch.image_size, arch.image_size, arch.in_chans], tf.float32)
    module = tf.Module()
    module.serve = tf.function(lambda images: {"logits": forward(images)}, input_signature=[spec])
    tf.saved_model.save(module, directory, signatures={"serving_default": module.serve})
    return directory


def load(directory: str):
    """The SavedModel's forward pass: float32 [N, H, W, C] -> [N, classes] logits (numpy)."""
    import tensorflow as tf

    serve = tf.saved_model.load(directory).signatures["serving_default"]
    return lambda images: serve(images=tf.constant(images, tf.float32))["logits"].numpy()


_EXPORT = flags.DEFINE_string("export", None, "An export directory (holds model.json).")
_OUT = flags.DEFINE_string("out", None, "Where the SavedModel goes (default EXPORT/savedmodel).")


def main(_):
    if not pruned.is_finished(_EXPORT.value):
        raise SystemExit(f"{_EXPORT.value}: not an export directory (no {pruned.MODEL_JSON})")
    model, variables = pruned.load_pruned(_EXPORT.value)
    out = _OUT.value or paths.join(_EXPORT.value, DIRECTORY)
    print(f"wrote {write(out, model.arch, variables['params'])}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["export"])
    app.run(main)
