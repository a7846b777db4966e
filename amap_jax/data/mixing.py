"""Mixup and CutMix of the DeiT/Swin recipe, in jax for the jitted train step.

Batch mode, as the reference recipe uses: one mixing coefficient per batch, and every image is
mixed with its partner in the reversed batch. Shapes are static, so the step compiles once:
both mixes are computed and one is selected, and the CutMix box is a mask built by comparing
index ranges with the box bounds. Lambda ~ Beta(alpha, alpha) comes from one uniform draw and a
fixed number of rejection-sampling tries, not `jax.random.beta`, whose loops and many draws add
seconds to every compilation of the train step on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with `smoothing / num_classes` off target and the rest on target."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """Mixes a batch [N, H, W, C] with its reverse; returns float images and soft targets [N, K].

    With probability `prob` the batch is mixed: by CutMix with probability `switch_prob` (when
    both alphas are positive), else by Mixup, with lambda ~ Beta(alpha, alpha). CutMix pastes
    a box of area about (1 - lambda) of the image, clipped at the borders, and lambda becomes
    1 - box area / image area. Targets are lambda * y + (1 - lambda) * y[::-1] of smoothed
    one-hot y. An alpha of 0 turns that method off; both 0 only smooths the labels.
    """
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    targets = smooth_targets(labels, num_classes, smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    # One draw for everything: each separate draw costs ~0.1 s of compilation on CPU.
    u = jax.random.uniform(rng, (4 + 2 * _BETA_DRAWS,))
    u_apply, u_switch, u_y, u_x = u[:4]
    u_mixup, u_cutmix = u[4:].reshape(2, _BETA_DRAWS)
    lam_mixup = _symmetric_beta(u_mixup, mixup_alpha) if mixup_alpha > 0 else 1.0
    lam_cutmix = _symmetric_beta(u_cutmix, cutmix_alpha) if cutmix_alpha > 0 else 1.0
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = u_switch < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
    lam = jnp.where(u_apply < prob, lam, 1.0)

    partner = images[::-1]
    mixed = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * partner
    box, box_lam = _cutmix_box(u_y, u_x, images.shape[1], images.shape[2], lam)
    cut = jnp.where(box[None, :, :, None], partner, images)
    images = jnp.where(use_cutmix, cut, mixed)
    lam = jnp.where(use_cutmix, box_lam, lam)
    return images, lam * targets + (1 - lam) * targets[::-1]


def _cutmix_box(
    u_y: jax.Array, u_x: jax.Array, h: int, w: int, lam: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Box of sides floor(side * sqrt(1 - lam)) centred uniformly, clipped to the image.

    Returns the [H, W] mask and the lambda that matches its true area.
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(h * ratio).astype(jnp.int32)
    cut_w = jnp.floor(w * ratio).astype(jnp.int32)
    cy = jnp.minimum(jnp.floor(u_y * h).astype(jnp.int32), h - 1)
    cx = jnp.minimum(jnp.floor(u_x * w).astype(jnp.int32), w - 1)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    rows = jax.lax.iota(jnp.int32, h)[:, None]
    cols = jax.lax.iota(jnp.int32, w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return box, 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)


_PROPOSALS = 8  # Rejection-sampling tries per Gamma draw.
_GAMMA_DRAWS = 2 * _PROPOSALS + 1  # Normals, acceptance tests, one boost for shape < 1.
_BETA_DRAWS = 2 * _GAMMA_DRAWS


def symmetric_beta(rng: jax.Array, alpha: float) -> jax.Array:
    """A scalar ~ Beta(alpha, alpha), as `mixup_cutmix` draws lambda."""
    return _symmetric_beta(jax.random.uniform(rng, (_BETA_DRAWS,)), alpha)


def _symmetric_beta(u: jax.Array, alpha: float) -> jax.Array:
    """X / (X + Y) of two Gamma(alpha) draws made from the uniforms `u` [_BETA_DRAWS]."""
    x, y = _gamma(u[:_GAMMA_DRAWS], alpha), _gamma(u[_GAMMA_DRAWS:], alpha)
    return jnp.where(x + y > 0, x / jnp.maximum(x + y, 1e-30), 0.5)


def _gamma(u: jax.Array, alpha: float) -> jax.Array:
    """Gamma(alpha) by Marsaglia and Tsang's method, all tries at once, the first accepted kept.

    A try is accepted with probability > 0.95 (shape >= 1), so all fail with probability
    < 1e-10; then the mode-like value d is returned. Shape < 1 uses
    Gamma(alpha) = Gamma(alpha + 1) * U^(1 / alpha).
    """
    u = jnp.clip(u, 1e-7, 1.0 - 1e-7)
    z = jnp.sqrt(2.0) * jax.lax.erf_inv(2.0 * u[:_PROPOSALS] - 1.0)  # Standard normals.
    shape = alpha + 1.0 if alpha < 1 else alpha
    d = shape - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    v = (1.0 + c * z) ** 3
    safe_v = jnp.maximum(v, 1e-12)
    log_u = jnp.log(u[_PROPOSALS : 2 * _PROPOSALS])
    accept = (v > 0) & (log_u < 0.5 * z**2 + d - d * safe_v + d * jnp.log(safe_v))
    sample = jnp.where(accept.any(), d * safe_v[jnp.argmax(accept)], d)
    if alpha < 1:
        sample = sample * u[-1] ** (1.0 / alpha)
    return sample
