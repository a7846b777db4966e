"""RandAugment of the DeiT/Swin recipe ("rand-m9-mstd0.5-inc1") as TensorFlow ops on uint8 images.

Each of `num_ops` layers picks one op of the "increasing" set uniformly and applies it with
probability `prob`, at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10];
signed ops negate their argument with probability 1/2. "Increasing" means a larger magnitude
is always a stronger change (Posterize keeps fewer bits, Solarize lowers its threshold,
enhancements move further from 1). The ops follow PIL's definitions, which the reference
recipe uses; geometric ops resample bilinearly (the reference uses bicubic, which TensorFlow's
projective transform lacks) and fill uncovered pixels with `fill`, the recipe's mean pixel.

All randomness is stateless and keyed by `seed`, so a tf.data pipeline that maps this function
stays deterministic under parallel calls. TensorFlow is imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from amap_jax.data.tf import import_tf

if TYPE_CHECKING:
    import tensorflow as tf

MAX_MAGNITUDE = 10.0


class _Op(NamedTuple):
    """fn(image, argument, fill) with argument = level(magnitude), negated at random if signed."""

    fn: Callable[[Any, Any, Any], Any]
    level: Callable[[Any], Any] | None = None
    signed: bool = False


def _tf() -> Any:
    return import_tf()


def _floor(x: Any) -> Any:
    tf = _tf()
    return tf.math.floor(tf.cast(x, tf.float32))


def _enhance(degenerate: Callable) -> Callable:
    """PIL's ImageEnhance ops: factor 1 + v blends away from (v < 0) or past the degenerate."""
    return lambda x, v, fill: _blend(degenerate(x), x, 1.0 + v)


def _warp(matrix: Callable) -> Callable:
    return lambda x, v, fill: _affine(x, matrix(x, v), fill)


# Levels map a magnitude m in [0, 10] to each op's argument, as the "increasing" set does.
_OPS: dict[str, _Op] = {
    "AutoContrast": _Op(lambda x, v, fill: _auto_contrast(x)),
    "Equalize": _Op(lambda x, v, fill: _equalize(x)),
    "Invert": _Op(lambda x, v, fill: 255 - x),
    "Rotate": _Op(_warp(lambda x, v: _rotation(x, v)), lambda m: m * 3.0, signed=True),
    "Posterize": _Op(lambda x, v, fill: _posterize(x, v), lambda m: 4.0 - _floor(m * 0.4)),
    "Solarize": _Op(lambda x, v, fill: _solarize(x, v), lambda m: 256.0 - _floor(m * 25.6)),
    "SolarizeAdd": _Op(lambda x, v, fill: _solarize_add(x, v), lambda m: _floor(m * 11.0)),
    "Color": _Op(_enhance(lambda x: _grey(x)), lambda m: m * 0.09, signed=True),
    "Contrast": _Op(_enhance(lambda x: _mean_grey(x)), lambda m: m * 0.09, signed=True),
    "Brightness": _Op(_enhance(lambda x: 0.0), lambda m: m * 0.09, signed=True),
    "Sharpness": _Op(_enhance(lambda x: _smooth(x)), lambda m: m * 0.09, signed=True),
    "ShearX": _Op(_warp(lambda x, v: [1.0, v, 0.0, 0.0, 1.0, 0.0]), lambda m: m * 0.03, True),
    "ShearY": _Op(_warp(lambda x, v: [1.0, 0.0, 0.0, v, 1.0, 0.0]), lambda m: m * 0.03, True),
    "TranslateX": _Op(_warp(lambda x, v: _translate_x(x, v)), lambda m: m * 0.045, True),
    "TranslateY": _Op(_warp(lambda x, v: _translate_y(x, v)), lambda m: m * 0.045, True),
}
OPS = tuple(_OPS)


def apply_op(
    image: tf.Tensor,
    name: str,
    magnitude: float | tf.Tensor,
    *,
    negate: bool | tf.Tensor = False,
    fill: Sequence[int] = (128, 128, 128),
) -> tf.Tensor:
    """Applies op `name` at `magnitude` (0..10; not clipped here) to a uint8 [H, W, 3] image."""
    tf = _tf()
    op = _OPS[name]
    value = tf.constant(0.0)
    if op.level is not None:
        value = tf.cast(op.level(tf.cast(magnitude, tf.float32)), tf.float32)
    if op.signed:
        value = tf.where(tf.cast(negate, tf.bool), -value, value)
    return op.fn(image, value, tf.constant(fill, tf.float32))


def rand_augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
    fill: Sequence[int] = (128, 128, 128),
) -> tf.Tensor:
    """`num_ops` random ops on a uint8 [H, W, 3] image; `seed` is a stateless seed, shape [2]."""
    tf = _tf()
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_ops)):
        image = _layer(image, layer_seed, magnitude, magnitude_std, prob, fill)
    return image


def _layer(
    image: tf.Tensor,
    seed: tf.Tensor,
    magnitude: float,
    magnitude_std: float,
    prob: float,
    fill: Sequence[int],
) -> tf.Tensor:
    tf = _tf()
    uniform_seed, normal_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    draws = tf.random.stateless_uniform([3], uniform_seed)
    noise = tf.random.stateless_normal([], normal_seed)
    index = tf.minimum(tf.cast(draws[0] * len(OPS), tf.int32), len(OPS) - 1)
    m = tf.clip_by_value(magnitude + magnitude_std * noise, 0.0, MAX_MAGNITUDE)
    negate = draws[1] < 0.5
    branches = [
        (lambda name=name: apply_op(image, name, m, negate=negate, fill=fill)) for name in OPS
    ]
    out = tf.cond(draws[2] < prob, lambda: tf.switch_case(index, branches), lambda: image)
    return tf.ensure_shape(out, image.shape)


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    tf = _tf()
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), saturated to uint8."""
    tf = _tf()
    d = tf.cast(degenerate, tf.float32)
    return _to_uint8(d + factor * (tf.cast(image, tf.float32) - d))


def _grey(image: tf.Tensor) -> tf.Tensor:
    """PIL's 'L' conversion (ITU-R 601-2 luma), broadcast back to three channels."""
    tf = _tf()
    luma = tf.reduce_sum(tf.cast(image, tf.float32) * [0.299, 0.587, 0.114], -1, keepdims=True)
    return tf.broadcast_to(tf.round(luma), tf.shape(image))


def _mean_grey(image: tf.Tensor) -> tf.Tensor:
    tf = _tf()
    return tf.fill(tf.shape(image), tf.round(tf.reduce_mean(_grey(image)[..., 0])))


def _smooth(image: tf.Tensor) -> tf.Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5, sum 13); the one-pixel border is kept."""
    tf = _tf()
    x = tf.cast(image, tf.float32)
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    inner = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
    inner = tf.pad(tf.round(inner), [[1, 1], [1, 1], [0, 0]])
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
    interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
    return tf.where(interior, inner, x)


def _auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """Stretches each channel's [min, max] to [0, 255]; constant channels are left alone."""
    tf = _tf()
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1])
    hi = tf.reduce_max(x, axis=[0, 1])
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    stretched = tf.clip_by_value(tf.floor((x - lo) * scale), 0.0, 255.0)
    return tf.cast(tf.where(hi > lo, stretched, x), tf.uint8)


def _equalize(image: tf.Tensor) -> tf.Tensor:
    """PIL's histogram equalisation, per channel."""
    tf = _tf()

    def channel(c: tf.Tensor) -> tf.Tensor:
        c = tf.cast(c, tf.int32)
        hist = tf.math.bincount(c, minlength=256, maxlength=256)
        last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
        step = (tf.reduce_sum(hist) - last) // 255
        lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
        return tf.where(step > 0, tf.gather(tf.minimum(lut, 255), c), c)

    channels = [channel(image[..., i]) for i in range(3)]
    return tf.cast(tf.stack(channels, -1), tf.uint8)


def _posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keeps the top `bits` bits (0 bits gives black)."""
    tf = _tf()
    shift = tf.cast(8 - tf.clip_by_value(bits, 0.0, 8.0), tf.int32)
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def _solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """Inverts pixels >= threshold."""
    tf = _tf()
    return tf.where(tf.cast(image, tf.float32) < threshold, image, 255 - image)


def _solarize_add(image: tf.Tensor, add: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
    """Adds `add` to pixels below `threshold`, saturating at 255."""
    tf = _tf()
    x = tf.cast(image, tf.float32)
    return tf.where(x < threshold, _to_uint8(tf.minimum(x + add, 255.0)), image)


def _size(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    tf = _tf()
    shape = tf.cast(tf.shape(image), tf.float32)
    return shape[0], shape[1]


def _rotation(image: tf.Tensor, degrees: tf.Tensor) -> list:
    """Counter-clockwise rotation about the image centre (output -> input map, as PIL's)."""
    tf = _tf()
    h, w = _size(image)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    a = degrees * (math.pi / 180.0)
    cos, sin = tf.cos(a), tf.sin(a)
    return [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]


def _translate_x(image: tf.Tensor, fraction: tf.Tensor) -> list:
    return [1.0, 0.0, fraction * _size(image)[1], 0.0, 1.0, 0.0]


def _translate_y(image: tf.Tensor, fraction: tf.Tensor) -> list:
    return [1.0, 0.0, 0.0, 0.0, 1.0, fraction * _size(image)[0]]


def _affine(image: tf.Tensor, matrix: list, fill: tf.Tensor) -> tf.Tensor:
    """Bilinear affine warp; `matrix` maps output (x, y) to input, outside pixels get `fill`.

    A channel of ones is warped along with the image, so pixels near the border blend with
    `fill` exactly as if the image were surrounded by it.
    """
    tf = _tf()
    x = tf.cast(image, tf.float32)
    x = tf.concat([x, tf.ones_like(x[..., :1])], -1)
    transform = tf.cast(tf.stack([*matrix, 0.0, 0.0]), tf.float32)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    return _to_uint8(out[..., :3] + (1.0 - out[..., 3:]) * fill)
