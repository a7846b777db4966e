"""Softmax and focused linear attention behind one interface.

Both take `qk_mask` (one multiplier for the paired q and k channels) and `v_scale` (one per
value channel, before the output projection), flat over heads: the `qk` and `v` sites. They are
applied where a pruned model would not have the channel at all, so a masked model and its
exported smaller model compute the same function.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amap_jax.models.arch import SOFTMAX, BlockArch, Geometry

dense_init = nn.initializers.truncated_normal(0.02)


def scale_rows(kernel: jax.Array, rows: jax.Array | None) -> jax.Array:
    """`kernel` [in, out] with input channel i scaled by `rows[i]` (None: unchanged)."""
    return kernel if rows is None else kernel * rows.astype(kernel.dtype)[:, None]


class Dense(nn.Module):
    """`nn.Dense` (same parameters) that takes a site's multiplier on its input channels
    (`rows`) or output channels (`cols`) and applies it to the kernel: [in, out] numbers
    instead of [batch x tokens, width] ones, and the mask's gradient comes from the weight
    gradient, with no extra pass over the activations."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, rows=None, cols=None):
        kernel = self.param("kernel", dense_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        kernel = scale_rows(kernel, rows)
        if cols is not None:
            kernel, bias = kernel * cols.astype(kernel.dtype), bias * cols.astype(bias.dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y + bias


def _heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, N, H*d] -> [B, H, N, d]."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(0, 2, 1, 3)


def _merge(x: jax.Array) -> jax.Array:
    """[B, H, N, d] -> [B, N, H*d]."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
    """[N, N] row of the (2w-1)^2 bias table for every pair of tokens in a w x w window."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(
        2, -1
    )
    rel = coords[:, :, None] - coords[:, None, :] + window - 1
    return rel[0] * (2 * window - 1) + rel[1]


@functools.cache
def shift_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """[windows, N, N] additive mask: after a cyclic shift, tokens that were not neighbours in
    the image (different regions) must not attend to each other."""
    region = np.zeros((resolution, resolution), np.int32)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(cuts):
        for j, cols in enumerate(cuts):
            region[rows, cols] = 3 * i + j
    n = resolution // window
    region = region.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, -1)
    return np.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).astype(np.float32)


class Attention(nn.Module):
    """Multi-head attention of either kind over one attention call's tokens: a ViT's [prefix
    tokens, grid x grid], or one window of a hierarchical model (windows folded into the batch)."""

    arch: BlockArch
    geometry: Geometry
    focusing_factor: float = 3.0
    kernel_size: int = 5
    dtype: jnp.dtype = jnp.float32
    # The per-(head, token) weight of token scores (`stats`): "value", the norm of the head's
    # attention output (A_h V_h)_j before the output projection (AS-ViT's official code), or
    # "residual", the norm of what the head adds to the residual stream after it.
    head_weight: str = "value"

    @nn.compact
    def __call__(self, x, qk_mask=None, v_scale=None, key_mask=None, stats=False):
        """`key_mask` [B, N] (token pruning, softmax only): tokens at 0 are no one's keys but
        their own. With `stats`, also (class attention [B, H, N], each head's weight
        [B, H, N], `head_weight`): what token scores are made of."""
        a, g = self.arch, self.geometry
        softmax = a.attn == SOFTMAX
        # On softmax attention a masked q channel drops out of every q.k sum: mask q's kernel.
        q = Dense(a.heads * a.qk_dim, self.dtype, name="q")(x, cols=qk_mask if softmax else None)
        k = Dense(a.heads * a.qk_dim, self.dtype, name="k")(x)
        v = Dense(a.heads * a.v_dim, self.dtype, name="v")(x)
        if softmax:
            out, cls_attn = self._softmax(q, k, v, key_mask)
        else:
            if key_mask is not None:
                raise ValueError("focused linear attention takes no key mask (token pruning)")
            out, cls_attn = self._focused_linear(q, k, v, qk_mask)
        proj = Dense(g.dim, self.dtype, name="proj")
        y = proj(out, rows=v_scale)  # value channels scaled where export folds them
        if not stats:
            return y
        if self.head_weight == "value":
            return y, (cls_attn, self._value_norms(out, v_scale))
        return y, (
            cls_attn,
            self._head_norms(out, scale_rows(proj.variables["params"]["kernel"], v_scale)),
        )

    def _value_norms(self, out, v_scale):
        """[B, H, N] norm of each head's attention output before the projection, over the
        value channels the model keeps (`v_scale` != 0; its reweight scales fold into the
        projection at export, so they are not part of it): the same in the export."""
        a = self.arch
        o = out.reshape(*out.shape[:2], a.heads, a.v_dim).astype(jnp.float32)
        if v_scale is not None:
            kept = jax.lax.stop_gradient(v_scale) != 0
            o = o * kept.reshape(a.heads, a.v_dim).astype(o.dtype)
        squares = jnp.sum(o * o, axis=-1).transpose(0, 2, 1)
        return jnp.sqrt(jnp.maximum(squares, 1e-24))  # a floor: finite root and gradient at 0

    def _head_norms(self, out, kernel):
        """[B, H, N] norm of each head's output after the projection, as the residual stream
        gets it (unchanged by export, which folds scales into `kernel`): |o W_h|^2 is
        o (W_h W_h^T) o^T, a [v, v] Gram matrix per head instead of a [B, H, N, dim] product
        (on DeiT-S 6x fewer MACs per token and no large intermediate)."""
        a = self.arch
        w = kernel.reshape(a.heads, a.v_dim, -1).astype(jnp.float32)
        o = out.reshape(*out.shape[:2], a.heads, a.v_dim).astype(jnp.float32)
        gram = jnp.einsum("hde,hfe->hdf", w, w)
        squares = jnp.einsum("bnhd,hdf,bnhf->bhn", o, gram, o)
        # Rounding can take a square of an all but zero output below 0; a floor keeps its
        # root (and gradient) finite.
        return jnp.sqrt(jnp.maximum(squares, 1e-24))

    def _softmax(self, q, k, v, key_mask=None):
        """Softmax normalised after weights x values: one divide per output channel instead of
        one per key, faster on CPU (`bench/studies/attention_core.py`)."""
        a = self.arch
        q, k, v = (_heads(t, a.heads) for t in (q, k, v))
        logits = jnp.matmul(q * jnp.asarray(a.scale, q.dtype), k.swapaxes(-1, -2))
        if a.window:
            logits = self._window_bias(logits)
        logits = logits.astype(jnp.float32)
        e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        if key_mask is not None:  # renormalised over the kept keys: the same as dropping
            eye = jnp.eye(e.shape[-1], dtype=e.dtype)
            m = key_mask[:, None, None, :].astype(e.dtype)
            e = e * (m + eye * (1 - m))
        total = jnp.sum(e, axis=-1, keepdims=True)
        cls_attn = e[:, :, 0, :] / total[:, :, 0]
        out = jnp.matmul(e.astype(v.dtype), v) / total.astype(v.dtype)
        return _merge(out), cls_attn

    def _window_bias(self, logits):
        """Relative position bias per head, plus the shift mask on shifted windows."""
        a, g = self.arch, self.geometry
        table = self.param(
            "relative_position_bias_table", dense_init, ((2 * a.window - 1) ** 2, a.heads)
        )
        bias = table[relative_position_index(a.window)].transpose(2, 0, 1)  # [H, N, N]
        logits = logits + bias.astype(logits.dtype)
        if a.shift:
            mask = jnp.asarray(shift_mask(g.resolution, a.window, a.shift), logits.dtype)
            n = g.window_tokens
            logits = logits.reshape(-1, g.windows, a.heads, n, n) + mask[None, :, None]
            logits = logits.reshape(-1, a.heads, n, n)
        return logits

    def _focused_linear(self, q, k, v, qk_mask):
        a, g = self.arch, self.geometry
        width = a.heads * a.qk_dim
        pos = self.param("positional_encoding", dense_init, (g.window_tokens, width))
        scale = self.param("scale", nn.initializers.zeros, (width,))
        k = k + pos.astype(k.dtype)
        q = jax.nn.relu(q) + 1e-6
        k = jax.nn.relu(k) + 1e-6
        if qk_mask is not None:  # after the +1e-6: masked channels are exactly 0 for the norms
            q = q * qk_mask.astype(q.dtype)
            k = k * qk_mask.astype(k.dtype)
        s = jax.nn.softplus(scale).astype(q.dtype)
        q, k = self._focus(q / s), self._focus(k / s)
        q, k, vh = (_heads(t, a.heads) for t in (q, k, v))
        n = q.shape[-2]
        z = 1.0 / (jnp.matmul(q, jnp.mean(k, axis=-2, keepdims=True).swapaxes(-1, -2)) + 1e-6)
        kv = jnp.matmul(k.swapaxes(-1, -2) * n**-0.5, vh * n**-0.5)
        out = jnp.matmul(q, kv) * z
        cls_row = jnp.matmul(q[:, :, :1], k.swapaxes(-1, -2))[:, :, 0]  # phi(q_cls) . phi(k_j)
        cls_attn = cls_row / jnp.sum(cls_row, axis=-1, keepdims=True)
        return _merge(out) + self._dwc(v), cls_attn.astype(jnp.float32)

    def _focus(self, x):
        """x**p with each token's norm (over all heads jointly) restored."""
        norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
        p = self.focusing_factor
        xp = x ** int(p) if float(p).is_integer() else x**p  # integer_pow: no exp/log
        return xp / jnp.linalg.norm(xp, axis=-1, keepdims=True) * norm

    def _dwc(self, v):
        """Depthwise conv over the patch grid; prefix (cls) tokens get no conv term."""
        a, side = self.arch, self.geometry.grid
        b, n, c = v.shape
        prefix = n - side**2
        grid = v[:, prefix:].reshape(b, side, side, c)
        if a.dwc_per_head:
            channels = c
        else:  # one kernel of width v_dim shared by all heads: fold heads into the batch
            channels = a.v_dim
            grid = grid.reshape(b, side, side, a.heads, a.v_dim)
            grid = grid.transpose(0, 3, 1, 2, 4).reshape(b * a.heads, side, side, -1)
        y = DepthwiseConv(channels, self.kernel_size, self.dtype, name="dwc")(grid)
        if not a.dwc_per_head:
            y = y.reshape(b, a.heads, side, side, a.v_dim).transpose(0, 2, 3, 1, 4)
        y = y.reshape(b, side**2, c)
        return jnp.pad(y, ((0, 0), (prefix, 0), (0, 0)))


class DepthwiseConv(nn.Module):
    """'SAME' depthwise conv as a sum of shifted images: on small token grids this is faster on
    CPU than XLA's grouped convolution. Parameters are laid out as `nn.Conv`'s."""

    channels: int
    kernel_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, 1, self.channels)
        ).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.channels,)).astype(self.dtype)
        h, w = x.shape[-3:-1]
        pad = k // 2
        xp = jnp.pad(x, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
        out = bias
        for i in range(k):
            for j in range(k):
                out = out + xp[:, i : i + h, j : j + w] * kernel[i, j, 0]
        return out
