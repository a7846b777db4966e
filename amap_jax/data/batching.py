"""Deterministic host batching and jit-friendly on-device preprocessing.

The training batch at step `s` is a pure function of (seed, s), so a run restored at step `s`
sees exactly the batches it would have seen without the interruption. Host code only gathers
uint8 images; normalisation, resizing and augmentation run in jax inside the jitted step.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax.data.sources import Source

T = TypeVar("T")
_PREFETCH = 2


def batch_indices(
    num_examples: int, batch_size: int, *, seed: int, step: int, shuffle: bool = True
) -> np.ndarray:
    """Indices of global batch `step`; each epoch is a fresh permutation, remainder dropped."""
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples")
    epoch, i = divmod(step, steps_per_epoch)
    order = _permutation(num_examples, seed, epoch) if shuffle else np.arange(num_examples)
    return order[i * batch_size : (i + 1) * batch_size].copy()


@functools.lru_cache(maxsize=2)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    return global_batch_size // process_count


def train_batches(
    source: Source,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled batches from `start_step` on; this process gets its slice of each."""
    local = _local_batch_size(global_batch_size, process_count)
    lo = process_index * local

    def produce() -> Iterator[dict[str, np.ndarray]]:
        for step in itertools.count(start_step):
            idx = batch_indices(len(source), global_batch_size, seed=seed, step=step)
            yield source.get(idx[lo : lo + local])

    return _prefetch(produce())


def eval_batches(
    source: Source, batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass; `batch_size` is global; padding has mask 0 so every shape is the same.

    Global batch `b` holds examples [b * batch_size, (b + 1) * batch_size) and each process takes
    its contiguous slice, so all processes yield the same number of batches and every example is
    counted exactly once.
    """
    local = _local_batch_size(batch_size, process_count)
    n = len(source)

    def produce() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, n, batch_size):
            idx = np.arange(local) + start + process_index * local
            mask = idx < n
            batch = source.get(np.where(mask, idx, 0))
            batch["mask"] = mask.astype(np.float32)
            yield batch

    return _prefetch(produce())


def _prefetch(items: Iterator[T], size: int = _PREFETCH) -> Iterator[T]:
    """Runs `items` in a background thread, `size` ahead, so host work overlaps device work."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except Exception as e:  # Re-raised in the consumer.
            put((None, e))

    def consume() -> Iterator[T]:
        threading.Thread(target=work, daemon=True).start()
        try:
            while True:
                item, error = q.get()
                if error is not None:
                    raise error
                if item is done:
                    return
                yield item
        finally:
            stop.set()

    return consume()


def preprocess(
    images: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    image_size: int | None = None,
) -> jax.Array:
    """uint8 [..., H, W, C] -> normalised float32, bilinearly resized to image_size if given."""
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    if image_size is not None and x.shape[-3:-1] != (image_size, image_size):
        shape = (*x.shape[:-3], image_size, image_size, x.shape[-1])
        x = jax.image.resize(x, shape, method="bilinear")
    return x


def augment(
    rng: jax.Array, images: jax.Array, *, crop_padding: int = 2, flip: bool = True
) -> jax.Array:
    """Per-image random translation (zero padded crop) and horizontal flip of [N, H, W, C]."""

    def one(key: jax.Array, image: jax.Array) -> jax.Array:
        crop_key, flip_key = jax.random.split(key)
        if crop_padding > 0:
            h, w, c = image.shape
            p = crop_padding
            padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
            dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * p + 1)
            image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
        if flip:
            image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
        return image

    return jax.vmap(one)(jax.random.split(rng, images.shape[0]), images)
