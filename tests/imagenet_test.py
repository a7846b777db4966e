"""Tests for the ImageNet pipeline (tfds mock data, a JPEG folder), RandAugment and mixing."""

import dataclasses
import itertools
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance, ImageOps

from amap_jax import data
from amap_jax.data import imagenet, mixing, randaugment

tf = imagenet.import_tf()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = imagenet.Recipe(image_size=32)
PLAIN = dataclasses.replace(SMALL, randaugment_ops=0, erasing_prob=0.0)  # Crop and flip only.


def _take(it, n):
    return list(itertools.islice(it, n))


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_library_imports_without_tensorflow():
    code = (
        "import sys; import amap_jax.data.imagenet, amap_jax.data.mixing, "
        "amap_jax.data.randaugment; assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert tf.config.get_visible_devices("GPU") == []  # Hidden once TensorFlow is imported.


# --- tfds ---------------------------------------------------------------------------------------


def test_not_prepared_fails_fast_in_one_line(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotFoundError) as e:
        imagenet.open_imagenet("train", str(tmp_path))
    assert time.perf_counter() - start < 5
    message = str(e.value)
    assert "\n" not in message
    assert "tfds build imagenet2012" in message and str(tmp_path) in message
    with pytest.raises(data.DatasetNotFoundError, match="not a registered"):
        imagenet.open_imagenet("train", str(tmp_path), name="no_such_dataset")
    with pytest.raises(data.DatasetNotFoundError, match="image_folder"):
        imagenet.open_imagenet("train", image_folder=str(tmp_path))


def test_mock_train_batches():
    with tfds.testing.mock_data(num_examples=20):
        split = imagenet.open_imagenet("train", "/nonexistent")
        all_labels = [int(r["label"]) for r in split.records(0, 1, drop_remainder=True)]
        batches = _take(imagenet.train_batches(split, 8, PLAIN, seed=0), 4)
    assert split.info.num_examples == 20 and split.info.num_classes == 1000
    assert split.info.mean == (0.485, 0.456, 0.406) and split.info.std == (0.229, 0.224, 0.225)
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32
        assert ((b["label"] >= 0) & (b["label"] < 1000)).all()
    # Two steps per epoch; each epoch draws distinct examples, in a new order.
    for epoch in (batches[:2], batches[2:]):
        labels = np.concatenate([b["label"] for b in epoch])
        remaining = list(all_labels)
        for label in labels:
            remaining.remove(label)  # Fails if an example repeats within the epoch.
    assert not np.array_equal(batches[0]["label"], batches[2]["label"])


def test_mock_resume_matches_uninterrupted_run():
    recipe = dataclasses.replace(SMALL, randaugment_ops=1)  # Every step on; one op is faster.
    with tfds.testing.mock_data(num_examples=9):  # Two steps per epoch, one example left out.
        split = imagenet.open_imagenet("train", "/nonexistent")
        full = _take(imagenet.train_batches(split, 4, recipe, seed=3), 4)
        resumed = _take(imagenet.train_batches(split, 4, recipe, seed=3, start_step=1), 3)
        other = _take(imagenet.train_batches(split, 4, PLAIN, seed=4), 1)
    for b in full:
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32 and ((b["label"] >= 0) & (b["label"] < 1000)).all()
    for a, b in zip(full[1:], resumed, strict=True):  # Steps 1..3 cross an epoch boundary.
        _assert_batches_equal(a, b)
    assert not np.array_equal(full[0]["label"], other[0]["label"])  # The seed orders the data.


def test_mock_eval_batches_cover_each_example_once():
    with tfds.testing.mock_data(num_examples=10):
        split = imagenet.open_imagenet("validation", "/nonexistent")
        labels = [int(r["label"]) for r in split.records(0, 1, drop_remainder=False)]
        batches = list(imagenet.eval_batches(split, 4, SMALL))
        again = list(imagenet.eval_batches(split, 4, SMALL))
    assert len(batches) == 3
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, [1.0] * 10 + [0.0] * 2)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:10], labels)
    assert all(b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8 for b in batches)
    assert not batches[-1]["image"][2:].any()
    for a, b in zip(batches, again, strict=True):
        _assert_batches_equal(a, b)


# --- image folder -------------------------------------------------------------------------------


def _colour(i: int) -> tuple[int, int, int]:
    """Image `i` is one flat colour, so crops, flips and resizes keep its identity."""
    return (8 * i + 4, 255 - 8 * i, 90)


def _identity(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1, 3).astype(int)
    assert (flat.max(1) - flat.min(1) <= 4).all(), "an image is not flat"
    return np.round((flat[:, 0, 0] - 4) / 8).astype(int)


def _write_tree(root, split: str, per_class: dict[str, int], first: int) -> dict[int, int]:
    """Writes flat images (JPEG, one PNG per class) and returns {image id: label}."""
    ids, i = {}, first
    for label, (name, count) in enumerate(sorted(per_class.items())):
        folder = root / split / name
        folder.mkdir(parents=True)
        for k in range(count):
            size = (40 + 3 * k, 30 + 5 * label)  # Sizes and aspect ratios vary.
            image = Image.new("RGB", size, _colour(i))
            image.save(folder / (f"{i}.png" if k == 0 else f"{i}.jpeg"), quality=95)
            ids[i], i = label, i + 1
    return ids


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    train = _write_tree(root, "train", {"cat": 4, "dog": 4, "eel": 4}, first=0)
    val = _write_tree(root, "val", {"cat": 3, "dog": 2, "eel": 2}, first=12)
    (root / "train" / "notes.txt").write_text("not an image")
    return root, train, val


def test_folder_train_shards_are_disjoint_and_cover_the_split(tree):
    root, ids, _ = tree
    split = imagenet.open_imagenet("train", image_folder=str(root))
    assert (split.info.num_examples, split.info.num_classes) == (12, 3)
    assert split.info.class_names == ("cat", "dog", "eel")
    seen = []
    for process in range(2):
        batches = _take(
            imagenet.train_batches(split, 4, PLAIN, seed=1, process_index=process, process_count=2),
            6,
        )
        assert all(b["image"].shape == (2, 32, 32, 3) for b in batches)
        epochs = [
            [(i, int(y)) for b in e for i, y in zip(_identity(b["image"]), b["label"], strict=True)]
            for e in (batches[:3], batches[3:])
        ]
        assert all(ids[i] == y for e in epochs for i, y in e)  # Labels follow the class folder.
        assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 6
        seen.append({i for i, _ in epochs[0]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(ids)


def test_folder_eval_batches_cover_each_example_once(tree):
    root, _, ids = tree
    split = imagenet.open_imagenet("val", image_folder=str(root))
    assert split.info.num_examples == 7
    found = []
    for process in range(2):
        batches = list(
            imagenet.eval_batches(split, 4, SMALL, process_index=process, process_count=2)
        )
        assert len(batches) == 2  # ceil(ceil(7 / 2) / 2) for every process.
        for b in batches:
            assert b["image"].shape == (2, 32, 32, 3) and b["mask"].shape == (2,)
            real = b["mask"] == 1
            found += [
                (i, int(y))
                for i, y in zip(_identity(b["image"][real]), b["label"][real], strict=True)
            ]
    assert sorted(found) == sorted(ids.items())


def test_full_recipe_on_folder(tree):
    root, _, _ = tree
    split = imagenet.open_imagenet("train", image_folder=str(root))
    (batch,) = _take(imagenet.train_batches(split, 6, SMALL, seed=0), 1)
    assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype == np.uint8
    plain = imagenet.Recipe(image_size=32, random_crop=False, flip=False, randaugment_ops=0)
    plain = dataclasses.replace(plain, erasing_prob=0.0)
    (batch,) = _take(imagenet.train_batches(split, 6, plain, seed=0), 1)
    _identity(batch["image"])  # Every step off: the flat images come through unchanged.


def test_eval_transform_matches_pil_resize_and_centre_crop():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([4 * x, 5 * y, 2 * (x + y)], -1) + rng.integers(0, 10, (48, 64, 3))
    pixels = pixels.clip(0, 255).astype(np.uint8)
    png = tf.io.encode_png(pixels)
    got = imagenet._eval_image(png, 32, 0.875).numpy()
    # Reference: shorter side to floor(32 / 0.875) = 36 (bicubic), then the centre 32 x 32.
    want = np.asarray(Image.fromarray(pixels).resize((48, 36), Image.BICUBIC))[2:34, 8:40]
    assert np.abs(got.astype(int) - want).mean() < 1.5
    np.testing.assert_array_equal(imagenet._eval_image(tf.constant(pixels), 32, 0.875), got)


def test_random_window_fits_and_falls_back_to_a_centre_crop():
    for s in range(50):
        top, left, h, w = imagenet._random_window(
            tf.constant([300, 400]), tf.constant([s, 1]), (0.08, 1.0), (3 / 4, 4 / 3)
        ).numpy()
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.08 * 0.9 <= h * w / 120000 <= 1.0 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # No 90%-area crop of a 10 x 1000 strip has a ratio within [3/4, 4/3]: centre 10 x 13.
    window = imagenet._random_window(
        tf.constant([10, 1000]), tf.constant([0, 0]), (0.9, 1), (3 / 4, 4 / 3)
    )
    np.testing.assert_array_equal(window, [0, 493, 10, 13])


def test_random_erasing():
    image = tf.fill([64, 64, 3], tf.constant(7, tf.uint8))
    np.testing.assert_array_equal(imagenet.random_erasing(image, tf.constant([0, 1]), 0.0), image)
    areas, values = [], []
    for s in range(20):
        out = imagenet.random_erasing(image, tf.constant([s, 2]), 1.0).numpy()
        changed = (out != 7).any(-1)
        rows, cols = np.nonzero(changed)
        box = out[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (box != 7).any(-1).mean() > 0.95  # One rectangle of noise.
        areas.append(box.shape[0] * box.shape[1] / 64**2)
        values.append(box.reshape(-1, 3))
    assert 0.02 * 0.8 <= min(areas) and max(areas) <= 1 / 3 * 1.2
    normalised = (np.concatenate(values) / 255 - imagenet.IMAGENET_MEAN) / imagenet.IMAGENET_STD
    np.testing.assert_allclose(normalised.mean(0), 0, atol=0.05)
    np.testing.assert_allclose(normalised.std(0), 1, atol=0.1)


# --- RandAugment --------------------------------------------------------------------------------


def _image(h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _op(image, name, magnitude, negate=False, fill=(128, 128, 128)):
    out = randaugment.apply_op(tf.constant(image), name, magnitude, negate=negate, fill=fill)
    return out.numpy()


@pytest.mark.parametrize("name", randaugment.OPS)
def test_every_op_keeps_shape_and_dtype(name):
    image = _image(24, 40)
    for magnitude, negate in [(0.0, False), (5.0, True), (10.0, False)]:
        out = _op(image, name, magnitude, negate)
        assert out.shape == image.shape and out.dtype == np.uint8


@pytest.mark.parametrize(
    "name",
    ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Brightness"]
    + ["Sharpness", "Solarize", "SolarizeAdd"],
)
def test_magnitude_zero_is_identity(name):
    image = _image()
    np.testing.assert_array_equal(_op(image, name, 0.0), image)
    np.testing.assert_array_equal(_op(image, name, 0.0, negate=True), image)


def test_ops_match_pil():
    image = _image(seed=1)
    pil = Image.fromarray(image)
    np.testing.assert_array_equal(_op(image, "Invert", 7.0), 255 - image)
    # Magnitude 5: Solarize threshold 256 - 128, Posterize 4 - 2 bits, SolarizeAdd + 55.
    np.testing.assert_array_equal(_op(image, "Solarize", 5.0), ImageOps.solarize(pil, 128))
    np.testing.assert_array_equal(_op(image, "Posterize", 5.0), ImageOps.posterize(pil, 2))
    assert not _op(image, "Posterize", 10.0).any()
    add = np.where(image < 128, np.minimum(image.astype(int) + 55, 255), image)
    np.testing.assert_array_equal(_op(image, "SolarizeAdd", 5.0), add)
    low = (image // 2 + 40).astype(np.uint8)
    np.testing.assert_array_equal(
        _op(low, "AutoContrast", 3.0), ImageOps.autocontrast(Image.fromarray(low))
    )
    np.testing.assert_array_equal(_op(image, "Equalize", 3.0), ImageOps.equalize(pil))
    enhancers = {
        "Color": ImageEnhance.Color,
        "Contrast": ImageEnhance.Contrast,
        "Brightness": ImageEnhance.Brightness,
        "Sharpness": ImageEnhance.Sharpness,
    }
    for name, enhancer in enhancers.items():
        for negate, factor in [(False, 1.45), (True, 0.55)]:  # 1 +- 0.9 * 5 / 10
            want = np.asarray(enhancer(pil).enhance(factor)).astype(int)
            diff = np.abs(_op(image, name, 5.0, negate) - want)
            assert diff.max() <= 2 and diff.mean() < 0.6, name


def test_geometric_ops_by_hand():
    image = _image(40, 40, seed=2)
    # Rotate: magnitude 30 is 90 degrees, counter-clockwise unless negated.
    np.testing.assert_allclose(_op(image, "Rotate", 30.0), np.rot90(image), atol=1)
    np.testing.assert_allclose(_op(image, "Rotate", 30.0, negate=True), np.rot90(image, -1), atol=1)
    # TranslateX by 0.1 of the width (magnitude 0.1 / 0.045): 4 pixels, filled with `fill`.
    out = _op(image, "TranslateX", 0.1 / 0.045, fill=(1, 2, 3))
    np.testing.assert_allclose(out[:, :36], image[:, 4:], atol=1)
    np.testing.assert_array_equal(out[:, 36:], np.broadcast_to([1, 2, 3], (40, 4, 3)))
    out = _op(image, "TranslateY", 0.1 / 0.045, negate=True, fill=(1, 2, 3))
    np.testing.assert_allclose(out[4:], image[:36], atol=1)
    # ShearX 0.1 (magnitude 0.1 / 0.03) shifts row y by 0.1 * y pixels.
    out = _op(image, "ShearX", 0.1 / 0.03)
    np.testing.assert_allclose(out[10, :-1], image[10, 1:], atol=1)
    np.testing.assert_allclose(out[20, :-2], image[20, 2:], atol=1)
    out = _op(image, "ShearY", 0.1 / 0.03)
    np.testing.assert_allclose(out[:-3, 30], image[3:, 30], atol=1)


def test_rand_augment_is_seeded():
    image = tf.constant(_image(seed=3))

    def run(seed, **kw):
        return randaugment.rand_augment(image, tf.constant([seed, 0]), **kw).numpy()

    np.testing.assert_array_equal(run(5), run(5))
    outputs = [run(s) for s in range(12)]
    assert sum(not np.array_equal(o, image) for o in outputs) >= 6
    assert len({o.tobytes() for o in outputs}) >= 6
    np.testing.assert_array_equal(run(5, prob=0.0), image)
    np.testing.assert_array_equal(run(5, num_ops=0), image)


# --- mixing -------------------------------------------------------------------------------------

_STATIC = ("num_classes", "mixup_alpha", "cutmix_alpha", "prob", "switch_prob", "smoothing")
_mix = jax.jit(mixing.mixup_cutmix, static_argnames=_STATIC)


def _batch(n=6, h=8, w=10):
    images = jax.random.normal(jax.random.key(0), (n, h, w, 3))
    return images, jnp.arange(n)


def test_label_smoothing_only():
    images, labels = _batch()
    out, targets = _mix(
        jax.random.key(1), images, labels, 10, mixup_alpha=0.0, cutmix_alpha=0.0, smoothing=0.1
    )
    np.testing.assert_array_equal(out, images)
    want = np.full((6, 10), 0.01)
    want[np.arange(6), np.arange(6)] = 0.91  # on = 1 - smoothing + smoothing / K.
    np.testing.assert_allclose(targets, want, rtol=1e-6)


def test_mixup_is_a_convex_combination_with_the_reversed_batch():
    images, labels = _batch()
    for seed in range(3):
        out, targets = _mix(
            jax.random.key(seed), images, labels, 6, cutmix_alpha=0.0, smoothing=0.0
        )
        lam = float(targets[0, 0])
        assert 0 < lam < 1 and float(targets[0, 5]) == pytest.approx(1 - lam, abs=1e-6)
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-5)


def test_cutmix_lambda_is_the_kept_area():
    n, h, w = 4, 16, 20
    images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, h, w, 3))
    boxes = 0
    for seed in range(8):
        out, targets = _mix(
            jax.random.key(seed), images, jnp.arange(n), n, mixup_alpha=0.0, smoothing=0.1
        )
        pasted = np.asarray(out[0, ..., 0] == n - 1)  # Image 0 gets its box from image 3.
        assert ((out[0] == 0) | (out[0] == n - 1)).all()
        lam = 1 - pasted.mean()
        off = 0.1 / n
        assert float(targets[0, 0]) == pytest.approx(lam * (1 - 0.1) + off, abs=1e-6)
        assert float(targets[0, n - 1]) == pytest.approx((1 - lam) * (1 - 0.1) + off, abs=1e-6)
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        if pasted.any():
            boxes += 1
            rows, cols = np.nonzero(pasted)
            assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert boxes >= 6


def test_mixing_prob_and_switch():
    images, labels = _batch()
    out, targets = _mix(jax.random.key(0), images, labels, 6, prob=0.0)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets, mixing.smooth_targets(labels, 6, 0.1))
    # Both methods on (the defaults): some batches are cut (every pixel copied from one of
    # the pair), the others blended.
    cut = []
    for seed in range(12):
        out, targets = _mix(jax.random.key(seed), images, labels, 6)
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        cut.append(bool(((out == images) | (out == images[::-1])).all()))
    assert 2 <= sum(cut) <= 10
    uint8 = (jnp.arange(6 * 8 * 10 * 3) % 256).astype(jnp.uint8).reshape(6, 8, 10, 3)
    out, _ = _mix(jax.random.key(0), uint8, labels, 6, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert out.dtype == jnp.float32


def test_symmetric_beta_distribution():
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: mixing.symmetric_beta(k, 0.8)))(keys))
    assert scipy.stats.kstest(draws, scipy.stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
