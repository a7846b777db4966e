"""The exported model as a TensorFlow SavedModel, for TF Serving and other TF runtimes.

  python -m amap_jax.io.savedmodel --export EXPORT [--out EXPORT/savedmodel]

`jax2tf` with native serialization: the SavedModel holds the same StableHLO as `forward.jax`
(an `XlaCallModule` op, lowered for CPU, CUDA and TPU), weights included, batch dimension
symbolic. Signature `serving_default`: `images` float32 [N, H, W, C], normalised as
EXPORT/model.json says -> `logits` [N, classes]. Needs TensorFlow (requirements-imagenet.txt),
which nothing else at run time does. Once written, the SavedModel is run in TensorFlow beside
the model; one that TensorFlow cannot run or that gives other logits is an error, not a file.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from amap_jax import logs, models
from amap_jax.io import artifact, paths, pruned
from amap_jax.models.arch import Arch

DIRECTORY = "savedmodel"


def write(directory: str, arch: Arch, params) -> str:
    """Writes the SavedModel to `directory` and returns it."""
    try:
        with logs.native_stderr_off():
            import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise RuntimeError(
            f"a SavedModel needs TensorFlow ({e}): pip install -r requirements-imagenet.txt"
        ) from None
    model = models.build(arch)
    params = jax.tree.map(np.asarray, params)

    def apply(images):
        return model.apply({"params": params}, images)

    forward = jax2tf.convert(
        apply,
        polymorphic_shapes=["(b, _, _, _)"],
        native_serialization_platforms=artifact.PLATFORMS,
        with_gradient=False,
    )
    spec = tf.TensorSpec([None, arch.image_size, arch.image_size, arch.in_chans], tf.float32)
    module = tf.Module()
    # autograph=False: the function is jax2tf's, with no Python control flow to convert (and
    # AutoGraph warns about every lambda it cannot read).
    module.serve = tf.function(
        lambda images: {"logits": forward(images)}, input_signature=[spec], autograph=False
    )
    tf.saved_model.save(module, directory, signatures={"serving_default": module.serve})
    _check(directory, apply, arch)
    return directory


def _check(directory: str, forward, arch: Arch) -> None:
    """Runs the SavedModel once in TensorFlow beside the jax forward: a TensorFlow whose XLA is
    older than the StableHLO this jax writes cannot run it, and that should fail here, not in
    serving. A SavedModel that fails is removed."""
    import tensorflow as tf

    shape = (2, arch.image_size, arch.image_size, arch.in_chans)
    images = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    try:
        got = load(directory)(images)
    except (tf.errors.OpError, ValueError) as e:
        paths.rmtree(directory)
        first = str(e).strip().splitlines()[0][:300]
        raise RuntimeError(
            f"TensorFlow {tf.__version__} cannot run the SavedModel that jax {jax.__version__} "
            f"wrote ({first}); its XLA must read StableHLO as new as this jax writes: use a "
            "newer TensorFlow or the versions of requirements.txt"
        ) from None
    gap = float(np.max(np.abs(got - np.asarray(forward(images)))))
    if not gap <= 1e-4:
        paths.rmtree(directory)
        raise RuntimeError(f"the SavedModel's logits differ from the model's by {gap:.2e}")


def load(directory: str):
    """The SavedModel's forward pass: float32 [N, H, W, C] -> [N, classes] logits (numpy)."""
    import tensorflow as tf

    serve = tf.saved_model.load(directory).signatures["serving_default"]
    return lambda images: serve(images=tf.constant(images, tf.float32))["logits"].numpy()


_EXPORT = flags.DEFINE_string("export", None, "An export directory (holds model.json).")
_OUT = flags.DEFINE_string("out", None, "Where the SavedModel goes (default EXPORT/savedmodel).")


def main(_):
    logs.quiet_libraries()
    if not pruned.is_finished(_EXPORT.value):
        raise SystemExit(f"{_EXPORT.value}: not an export directory (no {pruned.MODEL_JSON})")
    model, variables = pruned.load_pruned(_EXPORT.value)
    out = _OUT.value or paths.join(_EXPORT.value, DIRECTORY)
    try:
        print(f"wrote {write(out, model.arch, variables['params'])}")
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    flags.mark_flags_as_required(["export"])
    app.run(main)
