"""Tests for amap_jax.data: offline sources, deterministic batching, jax preprocessing."""

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from amap_jax import data
from amap_jax.data import sources


def _take(it, n):
    batches = list(itertools.islice(it, n))
    it.close()
    return batches


def _id_source(n: int) -> data.ArraySource:
    """Labels are example ids, so tests can see which examples a batch holds."""
    info = data.DatasetInfo("ids", "train", n, n, (2, 2, 1), (0.5,), (0.25,))
    return data.ArraySource(np.zeros((n, 2, 2, 1), np.uint8), np.arange(n), info)


def test_fashion_mnist_from_debian_files():
    # Deliberately not skipped: without the files this fails with the DatasetNotFoundError hint.
    train = data.load_source("fashion_mnist", "train")
    test = data.load_source("fashion_mnist", "test")
    assert isinstance(train, data.Source)
    assert (len(train), len(test)) == (60000, 10000)
    for src in (train, test):
        assert src.info.num_classes == 10
        assert src.info.class_names[0] == "T-shirt/top" and src.info.class_names[9] == "Ankle boot"
        assert src.info.image_shape == (28, 28, 1)
        assert src.info.mean == pytest.approx((0.2860,), abs=1e-4)
        assert src.info.std == pytest.approx((0.3530,), abs=1e-4)
    batch = test.get(np.arange(len(test)))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (10000, 28, 28, 1)
    assert batch["label"].dtype == np.int32
    assert batch["label"][:5].tolist() == [9, 2, 1, 1, 6]
    assert np.bincount(batch["label"]).tolist() == [1000] * 10
    assert np.bincount(train.get(np.arange(60000))["label"]).tolist() == [6000] * 10
    assert len(data.load_source("fashion_mnist", "train[-5000:]")) == 5000


def test_digits_splits():
    train = data.load_source("digits", "train")
    test = data.load_source("digits", "test")
    assert (len(train), len(test)) == (1497, 300)
    assert train.info.image_shape == (8, 8, 1) and train.info.num_classes == 10
    batch = test.get(np.array([0, 299]))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, 8, 8, 1)
    assert train.get(np.arange(1497))["image"].max() == 255
    assert len(data.load_source("digits", "train[:1000]")) == 1000
    assert len(data.load_source("digits", "train[:90%]")) == 1347
    tail = data.load_source("digits", "train[-300:]")
    np.testing.assert_array_equal(tail.get(np.arange(300))["label"], train.labels[-300:])
    with pytest.raises(ValueError, match="known splits"):
        data.load_source("digits", "validation")


def test_batch_indices_deterministic_and_epoch_disjoint():
    n, b = 103, 10
    kw = dict(seed=3)
    np.testing.assert_array_equal(
        data.batch_indices(n, b, step=7, **kw), data.batch_indices(n, b, step=7, **kw)
    )
    assert not np.array_equal(
        data.batch_indices(n, b, seed=3, step=0), data.batch_indices(n, b, seed=4, step=0)
    )
    for epoch in range(2):
        idx = np.concatenate(
            [data.batch_indices(n, b, step=epoch * 10 + s, **kw) for s in range(10)]
        )
        assert len(idx) == 100 and len(np.unique(idx)) == 100
    assert not np.array_equal(
        data.batch_indices(n, b, step=0, **kw), data.batch_indices(n, b, step=10, **kw)
    )
    np.testing.assert_array_equal(
        data.batch_indices(n, b, seed=0, step=11, shuffle=False), np.arange(10, 20)
    )
    with pytest.raises(ValueError):
        data.batch_indices(5, 10, seed=0, step=0)


def test_train_batches_resume_exactly():
    src = data.load_source("digits", "train")  # 46 steps per epoch at batch 32.
    fresh = _take(data.train_batches(src, 32, seed=1), 50)
    for start in (5, 44):
        resumed = _take(data.train_batches(src, 32, seed=1, start_step=start), 4)
        for got, want in zip(resumed, fresh[start : start + 4], strict=True):
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
    assert fresh[0]["image"].shape == (32, 8, 8, 1) and fresh[0]["label"].dtype == np.int32


def test_process_slices_concatenate_to_global_batch():
    src = _id_source(200)
    whole = _take(data.train_batches(src, 24, seed=0, start_step=3), 3)
    parts = [
        _take(
            data.train_batches(src, 24, seed=0, start_step=3, process_index=p, process_count=4), 3
        )
        for p in range(4)
    ]
    for step, batch in enumerate(whole):
        joined = np.concatenate([parts[p][step]["label"] for p in range(4)])
        np.testing.assert_array_equal(joined, batch["label"])
    with pytest.raises(ValueError, match="not divisible"):
        data.train_batches(src, 10, seed=0, process_count=4)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_cover_each_example_once(process_count):
    n, global_batch = 103, 16
    src = _id_source(n)
    per_process = [
        list(data.eval_batches(src, global_batch, p, process_count)) for p in range(process_count)
    ]
    assert len({len(batches) for batches in per_process}) == 1  # Same count for every process.
    seen = []
    for batches in per_process:
        for batch in batches:
            assert batch["image"].shape == (global_batch // process_count, 2, 2, 1)
            assert batch["mask"].dtype == np.float32
            seen.extend(batch["label"][batch["mask"] == 1].tolist())
    assert sorted(seen) == list(range(n))


def test_missing_fashion_mnist_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.FASHION_MNIST_ENV, str(tmp_path))
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_source("fashion_mnist", "train")
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "\n" not in message and "apt-get install -y dataset-fashion-mnist" in message


@pytest.mark.parametrize("name", ["cifar10", "not_a_dataset_xyz"])
def test_missing_tfds_dataset_fails_fast(tmp_path, name):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_source(name, "train[:90%]", data_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    assert "\n" not in str(e.value) and name in str(e.value)
    if name == "cifar10":
        assert "tfds build cifar10" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # Nothing downloaded or written.


def test_tfds_source_with_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=20):
        src = data.load_source("cifar10", "train", data_dir=str(tmp_path))
        assert isinstance(src, data.TfdsSource) and len(src) == 20
        assert src.info.image_shape == (32, 32, 3) and src.info.num_classes == 10
        assert src.info.mean == (0.4914, 0.4822, 0.4465)
        assert len(src.info.class_names) == 10  # the mock's metadata names them "0".."9"
        batch = src.get(np.arange(20))
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (20, 32, 32, 3)
        assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
        (first,) = _take(data.train_batches(src, 8, seed=0), 1)
        assert first["image"].shape == (8, 32, 32, 3)


def test_preprocess_normalises_and_resizes():
    images = jnp.full((4, 8, 8, 3), 255, jnp.uint8)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    out = jax.jit(data.preprocess, static_argnames="image_size")(images, mean, std)
    assert out.dtype == jnp.float32 and out.shape == (4, 8, 8, 3)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 3.0, 1.0], rtol=1e-6)
    resized = data.preprocess(images[..., :1], (0.5,), (0.5,), image_size=16)
    assert resized.shape == (4, 16, 16, 1)
    np.testing.assert_allclose(resized, 1.0, rtol=1e-6)


def test_augment_varies_per_image():
    image = jnp.arange(8 * 8 * 3, dtype=jnp.float32).reshape(8, 8, 3) + 1
    images = jnp.tile(image, (16, 1, 1, 1))
    out = jax.jit(data.augment)(jax.random.key(0), images)
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert not jnp.isnan(out).any()
    assert len({np.asarray(x).tobytes() for x in out}) > 1
    assert any(not np.array_equal(x, image) for x in out)
    flipped = data.augment(jax.random.key(1), images, crop_padding=0)
    assert all(np.array_equal(x, image) or np.array_equal(x, image[:, ::-1]) for x in flipped)
    same = data.augment(jax.random.key(2), images, crop_padding=0, flip=False)
    np.testing.assert_array_equal(same, images)


def test_default_validation_split_is_the_last_tenth_of_train():
    """Defaults are chosen on data.val_split: the training split's last 10% (Fashion-MNIST:
    54k / 6k), disjoint from what the model trains on; the test split is read only to report."""
    from amap_jax.config import defaults

    d = defaults().data
    full = data.load_source("digits", "train")
    train, val = data.load_source("digits", d.train_split), data.load_source("digits", d.val_split)
    assert len(train) + len(val) == len(full) and len(val) == round(0.1 * len(full))
    images = full.get(np.arange(len(full)))["image"]
    np.testing.assert_array_equal(val.get(np.arange(len(val)))["image"], images[len(train) :])
    assert data.sources.parse_split(d.train_split, {"train": 60000}) == (
        "train",
        slice(None, 54000),
    )
    assert data.sources.parse_split(d.val_split, {"train": 60000}) == ("train", slice(54000, None))
