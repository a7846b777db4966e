"""Adaptive token dropping: the sixth kind of site, between blocks of a ViT.

Before a pruning point, every patch token gets a score: the class token's attention to it in the
block before, summed over heads weighted by how much each head's output for that token counts
(its norm, normalised over heads), times the number of patch tokens so that a uniform map scores
1. Tokens at or below the point's threshold are dropped: masked out as keys of every later block
while training (`ViT.__call__`), really removed at inference (`dropping`: one compiled program
that picks, on the device, the segment compiled for the kept count's bucket). The class and
distillation tokens are always kept, and every token still attends to itself, so the masked
forward and the dropping forward compute the same logits.

Depthwise convolutions of focused linear attention need the whole token grid, so pruning
points must come after the last linear block; a model without a class token (Swin) has none.
"""

from __future__ import annotations

from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amap_jax.models.arch import LINEAR, ViTArch

REPORTS = "reports"  # what a forward pass reports to the loss: the keep mask at every point


class TokenSites(Protocol):
    """What a token-pruning method gives a ViT (hashable: a module field)."""

    def token_points(self, arch: ViTArch) -> tuple[int, ...]:
        """Blocks before which tokens may be dropped."""
        ...

    def token_mask(self, gate: nn.Module, k: int, score: jax.Array) -> jax.Array:
        """[B, N] keep mask at the k-th point (declares its variables in `gate`)."""
        ...


def check_points(arch, points) -> tuple[int, ...]:
    """Valid pruning points, or a one-line ValueError."""
    if not isinstance(arch, ViTArch):
        raise ValueError(f"token pruning needs a class token; {arch.name or 'this model'} has none")
    points = tuple(int(p) for p in points)
    depth = len(arch.blocks)
    if list(points) != sorted(set(points)) or not all(1 <= p < depth for p in points):
        raise ValueError(
            f"token pruning points {points} must be increasing block indices in [1, {depth})"
        )
    linear = [i for i, b in enumerate(arch.blocks) if b.attn == LINEAR]
    if linear and points and points[0] <= linear[-1]:
        raise ValueError(
            f"token pruning point {points[0]} comes before linear block {linear[-1]}, whose "
            "depthwise convolution needs every token"
        )
    return points


def points(arch, sites) -> tuple[int, ...]:
    """The pruning points of a model: the method's while searching, the architecture's after."""
    if sites is not None and hasattr(sites, "token_points"):
        return sites.token_points(arch)
    return arch.token_points


def score(stats, arch: ViTArch) -> jax.Array:
    """[B, N] token scores from a block's (class attention [B, H, N], head output norms
    [B, H, N]), scaled by the image's patch count (not the tokens left: dropping must not
    change a score); prefix tokens score +inf (always kept)."""
    cls_attn, norms = stats
    weight = norms / (jnp.sum(norms, axis=1, keepdims=True) + 1e-12)
    s = jnp.sum(cls_attn * weight, axis=1) * arch.grid**2
    return jnp.where(is_prefix(s, arch), jnp.inf, s)


def is_prefix(tokens: jax.Array, arch: ViTArch) -> jax.Array:
    """[N]: which tokens are prefix (class, distillation) tokens. A select, not
    `.at[].set()`: it fuses with its neighbours, a scatter is one more kernel launch."""
    return jnp.arange(tokens.shape[-1]) < arch.num_prefix


class TokenGate(nn.Module):
    """The keep mask at each pruning point: the method's while searching, else the learnt
    thresholds of an exported model (`thresholds`, one per point)."""

    arch: ViTArch
    num_points: int
    sites: TokenSites | None = None

    @nn.compact
    def __call__(self, k: int, stats, keep=None):
        s = score(stats, self.arch)
        if self.sites is not None and hasattr(self.sites, "token_mask"):
            mask = self.sites.token_mask(self, k, s)
        else:
            thresholds = self.param("thresholds", nn.initializers.zeros, (self.num_points,))
            mask = (s > thresholds[k]).astype(s.dtype)
        # Prefix tokens score +inf, but an infinite threshold must not drop them either.
        mask = jnp.where(is_prefix(mask, self.arch), jnp.ones_like(mask), mask)
        mask = mask if keep is None else mask * keep
        self.sow(REPORTS, "keep", mask)
        return mask


def gate(arch, sites, pts) -> TokenGate:
    return TokenGate(arch, len(pts), sites if hasattr(sites, "token_mask") else None)


def default_buckets(arch: ViTArch) -> tuple[int, ...]:
    """Multiples of 8 up to the full token count, which is always one."""
    return multiples(arch, 8)


def multiples(arch: ViTArch, multiple: int) -> tuple[int, ...]:
    n = arch.num_tokens
    return (*range(multiple, n, multiple), n)


def check_buckets(arch: ViTArch, buckets) -> tuple[int, ...]:
    """Token counts a segment after a pruning point is compiled for: sorted, without repeats,
    none above the full count; a one-line ValueError for a list that cannot hold every count
    (the full one needs a bucket too)."""
    buckets = tuple(int(b) for b in buckets)
    if any(b < 1 for b in buckets):
        raise ValueError(f"token buckets {buckets} must be positive token counts")
    n = arch.num_tokens
    if not buckets or max(buckets) < n:
        raise ValueError(
            f"token buckets {buckets} cannot hold all {n} tokens of a "
            f"{arch.name or 'ViT'} image: add {n}"
        )
    return tuple(sorted({min(b, n) for b in buckets}))


def buckets_of(arch: ViTArch) -> tuple[int, ...]:
    """The buckets an exported model drops tokens with: its own (`token_buckets`), else the
    default."""
    return check_buckets(arch, getattr(arch, "token_buckets", ()) or default_buckets(arch))


GROUPS = 4  # parts a batch may run in after each pruning point, sorted by kept count


def groups_of(arch) -> int:
    """The parts an exported model runs a batch in (`token_groups`; 0, not yet measured: 1)."""
    return max(1, int(getattr(arch, "token_groups", 1)))


def dropping(model, buckets=None, groups: int | None = None):
    """`(variables, images) -> (logits, kept patch tokens [B, points])`: tokens really dropped,
    in one jittable function with no host round trip.

    At each pruning point, on the device: the model's gate gives the keep mask; the tokens are
    ordered kept first (each group in its original order, so prefix tokens stay first); the
    largest kept count picks a bucket K (the smallest of `buckets` that holds it, read off the
    sorted mask), and `jax.lax.switch` runs the branch compiled for K: the first K
    tokens through the blocks up to the next point (or to the logits), padded back to the full
    token count so that every branch has one output type. A program holds points x buckets
    branches; only the taken one runs. Images that keep fewer than K tokens have the extra
    ones masked out as keys (the keep mask), so every image gets its batch-1 logits.

    Batch 1 runs at the image's own bucket. A batch is sorted by kept count at each point and
    run in `groups` equal parts (`jax.lax.map`, one switch compiled once), each at the bucket
    of its own largest count: one image that keeps many tokens costs its part, not the whole
    batch. Parts made only of padding (a batch smaller than `groups`, as the symbolic batch of
    an artifact may be) take a branch that computes nothing. Parts pay off where a part's work
    outweighs the loop's launches (DeiT-S on CPU at batch 64: 1.36x dense in 4 parts, 1.31x in
    one, `bench.token_speed`), not on a small model (Fashion-MNIST's), so an export measures its
    `token_groups`.
    `buckets`, `groups`: None, the architecture's (`buckets_of`, `groups_of`); `groups` 1: the
    whole batch at its largest count.
    """
    arch = model.arch
    pts = points(arch, model.sites)
    if not pts:
        raise ValueError(f"{arch.name or 'this model'} drops no tokens")
    buckets = check_buckets(arch, buckets_of(arch) if buckets is None else buckets)
    groups = groups_of(arch) if groups is None else groups
    if groups < 1:
        raise ValueError(f"token dropping groups must be at least 1, got {groups}")
    bounds = (*pts, len(arch.blocks))
    n = arch.num_tokens

    def first(m, images):
        return m.run(m.embed(images), 0, pts[0], None, stats=True)

    def gate(k):
        return lambda m, stats, keep: m.token_gate(k, stats, keep)

    def segment(k, size):
        last = k == len(pts) - 1

        def run(m, x, slots, dropped):
            # the first `size` tokens in kept-first order: one gather (sorting all of x
            # outside and slicing here would be two launches)
            x = jnp.take_along_axis(x, slots[:, :size, None], axis=1, mode="promise_in_bounds")
            x, stats = m.run(x, bounds[k], bounds[k + 1], -dropped[:, :size], stats=not last)
            if last:
                return m.logits(x)
            pad = lambda t: jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, n - size)])  # noqa: E731
            return jnp.pad(x, ((0, 0), (0, n - size), (0, 0))), jax.tree.map(pad, stats)

        # The variables are an operand of the switch, not a closure of each branch: the
        # weights are then one value shared by every branch (one constant in an export).
        return lambda v, *args: model.apply(v, *args, method=run)

    inner = np.asarray(buckets[:-1], np.int32)  # the full count holds every image

    def bucket(dropped):
        """The smallest bucket that holds every row's kept count, read off the sorted masks:
        a count is above bucket s when slot s (from 0) is kept, so no sum and no search."""
        if not len(inner):
            return jnp.int32(0)
        return jnp.sum(jnp.any(dropped[:, inner] < 0, axis=0), dtype=jnp.int32)

    def in_parts(branches, variables, x, slots, dropped):
        """A point's segment `branches` on a batch sorted by kept count (largest first), in
        `groups` parts of ceil(B / groups) images (the batch padded with its last image)."""
        b = x.shape[0]
        per = (b + groups - 1) // groups

        def nothing(v, *args):
            shapes = jax.eval_shape(branches[-1], v, *args)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def split(t):
            t = jnp.pad(t, [(0, per * groups - b)] + [(0, 0)] * (t.ndim - 1), mode="edge")
            return t.reshape(groups, per, *t.shape[1:])

        def part(args):
            x, slots, dropped, real = args
            index = jnp.where(real, bucket(dropped), len(buckets))
            return jax.lax.switch(index, [*branches, nothing], variables, x, slots, dropped)

        real = jnp.arange(groups) * per < b
        out = jax.lax.map(part, (split(x), split(slots), split(dropped), real))
        return jax.tree.map(lambda t: t.reshape(groups * per, *t.shape[2:])[:b], out)

    def forward(variables, images):
        x, stats = model.apply(variables, images, method=first)
        b = x.shape[0]
        parts = groups > 1 and not (isinstance(b, int) and b == 1)
        order = jnp.arange(b)  # the image each row holds
        keep, drops = None, []
        for k in range(len(pts)):
            mask = model.apply(variables, stats, keep, method=gate(k))
            # Kept first, each group in its order: one stable sort gives the order and the
            # sorted mask, negated (-1 kept, 0 dropped). The negation is left to the sort's
            # consumers, where it fuses; a batch of known size sorts a constant iota.
            if isinstance(b, int):
                iota = np.broadcast_to(np.arange(mask.shape[1], dtype=np.int32), mask.shape)
            else:
                iota = jax.lax.broadcasted_iota(jnp.int32, mask.shape, 1)
            dropped, slots = jax.lax.sort((-mask, iota), dimension=1, is_stable=True, num_keys=1)
            branches = [segment(k, size) for size in buckets]
            if parts:
                rows = jnp.argsort(jnp.sum(dropped, axis=-1), stable=True)  # most kept first
                x, slots, dropped, order = x[rows], slots[rows], dropped[rows], order[rows]
                out = in_parts(branches, variables, x, slots, dropped)
            else:
                out = jax.lax.switch(bucket(dropped), branches, variables, x, slots, dropped)
            keep = -dropped
            drops.append((dropped, order))
            if k < len(pts) - 1:
                x, stats = out

        # patch tokens kept [B, points], summed in one reduction after the last point
        kept = jnp.sum(jnp.stack([d for d, _ in drops], 1), axis=-1).astype(jnp.int32)
        kept = -kept - arch.num_prefix
        if not parts:
            return out, kept
        back = [kept[:, k][jnp.argsort(rows)] for k, (_, rows) in enumerate(drops)]
        return out[jnp.argsort(order)], jnp.stack(back, -1)  # each image in its own row

    return forward


_CACHE: dict = {}


def compiled(model, buckets=None, groups: int | None = None):
    """`dropping(model, buckets, groups)`, jitted once per (model, buckets, groups)."""
    buckets = check_buckets(model.arch, buckets_of(model.arch) if buckets is None else buckets)
    key = (model, buckets, groups_of(model.arch) if groups is None else groups)
    if key not in _CACHE:
        _CACHE[key] = jax.jit(dropping(model, *key[1:]))
    return _CACHE[key]


def predict(model, variables, images, *, multiple: int | None = None, buckets=None, groups=None):
    """Logits with tokens really dropped, and the patch tokens each image kept per point
    ([B, points]; None for a model that drops none): `dropping`'s one compiled program.

    `buckets`: the token counts it compiles for; else multiples of `multiple` (and the full
    count); else the architecture's (`buckets_of`). Whatever the buckets and `groups` (parts
    a batch runs in; None, the architecture's), every image gets its batch-1 logits.
    """
    if not points(model.arch, model.sites):
        return jax.jit(model.apply)(variables, images), None
    if buckets is None and multiple:
        buckets = multiples(model.arch, multiple)
    return compiled(model, buckets, groups)(variables, images)
