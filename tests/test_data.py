"""Data: digits splits, augmentation ops (eager and in tf.data), batch streams (docs/design.md)."""

import numpy as np
import pytest
import tensorflow as tf

from scott_jax.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PURPOSES,
    Source,
    crop_box,
    eval_batches,
    eval_transform,
    load_source,
    normalize,
    pretrain_batches,
    random_flip,
    random_resized_crop,
    steps_per_epoch,
)

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


@pytest.fixture(scope="module")
def digits():
    return {purpose: load_source("digits", purpose) for purpose in PURPOSES}


@pytest.fixture(scope="module")
def numbered():
    """20 random 16x16 images whose label is their index, to track examples through batches."""
    images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    return Source("numbered", "pretrain", images, np.arange(20, dtype=np.int32), 20)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def batched_map(fn, n):
    """fn(i) for i in range(n), stacked, run inside tf.data (the way the pipeline runs ops)."""
    return next(iter(tf.data.Dataset.range(n).map(fn).batch(n))).numpy()


# ---------------------------------------------------------------------------
# Sources


def test_digits_images(digits):
    source = digits["pretrain"]
    assert (source.name, source.num_examples, source.num_classes) == ("digits", 1797, 10)
    assert source.images.shape == (1797, 32, 32, 3) and source.images.dtype == np.uint8
    assert source.labels.shape == (1797,) and source.labels.dtype == np.int32
    # Gray digits on a black background (corners are empty), full 0..255 range (16 -> 255),
    # three equal channels.
    assert source.images.min() == 0 and source.images.max() == 255
    np.testing.assert_array_equal(source.images[..., 0], source.images[..., 2])
    assert np.all(source.images[:, :2, :2] == 0) and 60 < source.images.mean() < 100
    assert set(np.unique(source.labels)) == set(range(10))


def test_digits_splits_are_disjoint_stratified_and_fixed(digits):
    sizes = {purpose: source.num_examples for purpose, source in digits.items()}
    assert sizes == {"pretrain": 1797, "probe_train": 1008, "probe_select": 250, "test": 539}
    # Identify examples by their pixels: the three probe splits partition the pretrain set.
    keys = {p: {img.tobytes() for img in s.images} for p, s in digits.items() if p != "pretrain"}
    all_keys = {img.tobytes() for img in digits["pretrain"].images}
    assert not keys["test"] & keys["probe_train"]
    assert not keys["test"] & keys["probe_select"]
    assert not keys["probe_train"] & keys["probe_select"]
    assert keys["test"] | keys["probe_train"] | keys["probe_select"] == all_keys
    # Stratified: every class's share of the test split is 30 % of that class, within rounding.
    all_counts = np.bincount(digits["pretrain"].labels, minlength=10)
    test_counts = np.bincount(digits["test"].labels, minlength=10)
    assert np.all(np.abs(test_counts - 0.3 * all_counts) <= 0.5)
    rest_counts = all_counts - test_counts
    select_counts = np.bincount(digits["probe_select"].labels, minlength=10)
    assert np.all(np.abs(select_counts - 0.2 * rest_counts) <= 0.5)
    # Fixed: loading again gives the same split.
    np.testing.assert_array_equal(load_source("digits", "test").images, digits["test"].images)


def test_labels_per_class(digits):
    few = load_source("digits", "probe_train", labels_per_class=10)
    np.testing.assert_array_equal(np.bincount(few.labels), np.full(10, 10))
    train_keys = {img.tobytes() for img in digits["probe_train"].images}
    assert {img.tobytes() for img in few.images} <= train_keys
    np.testing.assert_array_equal(
        load_source("digits", "probe_train", labels_per_class=10).images, few.images
    )
    with pytest.raises(ValueError, match=r"\[1, 98\]"):
        load_source("digits", "probe_train", labels_per_class=99)
    with pytest.raises(ValueError, match="'probe_train' only"):
        load_source("digits", "test", labels_per_class=10)


def test_unknown_source_or_purpose():
    with pytest.raises(ValueError, match="known sources: digits"):
        load_source("mnist", "pretrain")
    with pytest.raises(ValueError, match="probe_select"):
        load_source("digits", "train")


def test_source_validates_arrays():
    with pytest.raises(ValueError, match="uint8"):
        Source("x", "test", np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int32), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        Source("x", "test", np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 2], np.int32), 2)


# ---------------------------------------------------------------------------
# Augmentation ops


def test_crop_box_statistics():
    """torchvision RandomResizedCrop windows: area in [0.2, 1], ratio in [3/4, 4/3], inside."""
    boxes = batched_map(lambda i: crop_box(224, 224, tf.stack([i, 7]), (0.2, 1.0)), 2000)
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= 224) & (left + w <= 224))
    area = h * w / 224**2
    # Sides are rounded to whole pixels, so the bounds hold up to ~1 px per side.
    assert area.min() >= 0.2 - 2 / 224 and area.max() <= 1.0
    assert area.min() < 0.22 and area.max() > 0.95  # The whole range is used.
    aspect = w / h
    assert aspect.min() >= 0.75 - 0.01 and aspect.max() <= 4 / 3 + 0.01
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    # Placement is random: small crops land all over the image.
    small = area < 0.3
    assert np.ptp(top[small]) > 100 and np.ptp(left[small]) > 100


def test_crop_box_falls_back_to_a_centre_crop():
    """When no attempt fits (a 10:1 strip), the image clamped to the max ratio is centred."""
    np.testing.assert_array_equal(crop_box(10, 100, [1, 2], (1.0, 1.0)), [0, 43, 10, 13])
    np.testing.assert_array_equal(crop_box(100, 10, [1, 2], (1.0, 1.0)), [43, 0, 13, 10])


def test_random_resized_crop_eager_equals_tf_data_and_depends_on_seed(digits):
    image = tf.constant(digits["pretrain"].images[0])
    eager = np.stack([random_resized_crop(image, [3, i], 48).numpy() for i in range(4)])
    in_graph = batched_map(lambda i: random_resized_crop(image, tf.stack([3, i]), 48), 4)
    assert eager.shape == (4, 48, 48, 3) and eager.dtype == np.uint8
    np.testing.assert_array_equal(eager, in_graph)
    assert len({crop.tobytes() for crop in eager}) == 4
    # A full-image crop (scale 1, square image) is just the bicubic resize.
    full = random_resized_crop(image, [0, 0], 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(full, image)


def test_random_flip_frequency():
    image = tf.reshape(tf.range(2 * 5 * 3, dtype=tf.int32), [2, 5, 3])
    flipped = batched_map(lambda i: random_flip(image, tf.stack([i, 1])), 2000)
    is_flipped = np.all(flipped == image.numpy()[:, ::-1], axis=(1, 2, 3))
    is_same = np.all(flipped == image.numpy(), axis=(1, 2, 3))
    assert np.all(is_flipped ^ is_same)
    assert 0.45 < is_flipped.mean() < 0.55


def test_normalize_uses_imagenet_stats():
    out = normalize(tf.constant([[[0, 0, 0], [255, 255, 255]]], tf.uint8)).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], -MEAN / STD, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], (1 - MEAN) / STD, rtol=1e-6)


def test_eval_transform_resizes_shorter_side_then_centre_crops():
    image = np.random.default_rng(1).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    # The shorter side is already 256 (= 224 * 256 / 224): no resize, a centred 224 crop.
    np.testing.assert_array_equal(eval_transform(image, 224), image[16:240, 48:272])
    # Shorter side 73 (= round(64 * 256 / 224)), longer side scaled: a 64 x 64 centre crop.
    tall = np.full((100, 50, 3), 9, np.uint8)
    out = eval_transform(tall, 64).numpy()
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and np.all(out == 9)


# ---------------------------------------------------------------------------
# Pretraining stream


def test_pretrain_batches_shapes_identical_views_and_normalisation(digits):
    batch = next(pretrain_batches(digits["pretrain"], batch_size=16, img_size=32, seed=0))
    assert batch["context"].shape == batch["target"].shape == (16, 32, 32, 3)
    assert batch["context"].dtype == batch["target"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    # aug='none': the two views are the same crop and flip with no colour change.
    np.testing.assert_array_equal(batch["context"], batch["target"])
    # ImageNet-normalised gray uint8: un-normalising gives equal channels on the 1/255 grid,
    # and the black background maps to exactly -mean / std.
    pixels = batch["context"] * STD + MEAN
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
    np.testing.assert_allclose(pixels * 255, np.round(pixels * 255), atol=1e-3)
    assert pixels.min() > -1e-6 and pixels.max() < 1 + 1e-6
    np.testing.assert_allclose(batch["context"].min(axis=(0, 1, 2)), -MEAN / STD, rtol=1e-5)


STREAM = dict(batch_size=8, img_size=16, seed=3)  # 20 examples: 2 steps per epoch, 4 dropped.


@pytest.fixture(scope="module")
def stream(numbered):
    """Steps 0..5 (three epochs) of the run from step 0, the reference for the tests below."""
    return take(pretrain_batches(numbered, **STREAM), 6)


def test_pretrain_batches_are_deterministic(numbered, stream):
    assert_same_batches(take(pretrain_batches(numbered, **STREAM), 2), stream[:2])
    other = next(pretrain_batches(numbered, **{**STREAM, "seed": 4}))
    assert not np.array_equal(other["label"], stream[0]["label"])
    assert not np.array_equal(other["context"], stream[0]["context"])


def test_epochs_drop_last_and_reshuffle(stream):
    assert steps_per_epoch(20, 8) == 2
    epoch0, epoch1 = (np.concatenate([b["label"] for b in stream[i : i + 2]]) for i in (0, 2))
    # 16 of the 20 examples per epoch, none twice; a new order every epoch.
    assert len(set(epoch0)) == len(set(epoch1)) == 16
    assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize("start_step", [1, 2, 3])
def test_resume_continues_the_stream(numbered, stream, start_step):
    """start_step=s yields steps s, s+1, ... of the run from 0: mid-epoch, at and past an epoch."""
    resumed = take(pretrain_batches(numbered, start_step=start_step, **STREAM), 3)
    assert_same_batches(resumed, stream[start_step : start_step + 3])


def test_process_shards_concatenate_to_the_global_batch(numbered, stream):
    """Two hosts, resumed at step 3: their halves joined are the single-host batches 3..5."""
    shards = [
        take(
            pretrain_batches(numbered, start_step=3, process_index=p, process_count=2, **STREAM), 3
        )
        for p in range(2)
    ]
    assert shards[0][0]["context"].shape == (4, 16, 16, 3)
    joined = [
        {key: np.concatenate([a[key], b[key]]) for key in a} for a, b in zip(*shards, strict=True)
    ]
    assert_same_batches(joined, stream[3:6])


def test_color_on_device_yields_the_uncoloured_uint8_view(numbered, stream):
    """The device mode yields the crop and flip the float views are made of (any aug), as
    uint8, and resumes like the default stream."""
    device = take(pretrain_batches(numbered, color_on_device=True, aug="diff", **STREAM), 4)
    assert device[0].keys() == {"view", "label"}
    assert device[0]["view"].shape == (8, 16, 16, 3) and device[0]["view"].dtype == np.uint8
    for ours, theirs in zip(device, stream[:4], strict=True):
        np.testing.assert_array_equal(ours["label"], theirs["label"])
        np.testing.assert_allclose(
            (ours["view"] / 255.0 - MEAN) / STD, theirs["context"], atol=1e-5
        )
    resumed = take(pretrain_batches(numbered, color_on_device=True, start_step=3, **STREAM), 1)
    assert_same_batches(resumed, device[3:4])


def first_views(images: np.ndarray, encode=None, seed: int = 1) -> np.ndarray:
    """int [8, 16, 16, 3]: the first device-mode views of 8 images, held as pixels or, with
    ``encode`` (image -> bytes tensor), as in-memory files (the TFDS datasets' storage)."""
    if encode is not None:
        files = np.empty(len(images), object)
        files[:] = [encode(image).numpy() for image in images]
        images = files
    source = Source("s", "pretrain", images, np.arange(len(images), dtype=np.int32), 8)
    kwargs = dict(batch_size=8, img_size=16, seed=seed, color_on_device=True)
    return next(pretrain_batches(source, **kwargs))["view"].astype(int)


def test_jpeg_decodes_only_the_crop_window_other_formats_in_full():
    """PNG: exactly the views of the decoded pixels. JPEG (decode_and_crop_jpeg): the same crop
    and flip, up to a few levels along the window's edge where the chroma upsampling differs."""
    x = np.linspace(0, 1, 48)
    smooth = np.stack([np.outer(x, x), np.outer(x, 1 - x), np.outer(1 - x, x)], -1) * 255
    images = np.stack([np.roll(smooth, 5 * i, axis=1) for i in range(8)]).astype(np.uint8)
    np.testing.assert_array_equal(first_views(images, tf.io.encode_png), first_views(images))

    def jpeg(image):
        return tf.io.encode_jpeg(image, quality=95)

    decoded = np.stack([tf.io.decode_jpeg(jpeg(image)) for image in images])
    window = first_views(images, jpeg)
    diff = np.abs(window - first_views(decoded))
    assert diff.mean() < 1.0 and np.mean(diff > 0) < 0.2
    assert np.abs(window - first_views(decoded, seed=2)).mean() > 10  # Another crop.


def test_pretrain_batches_bad_arguments(numbered):
    with pytest.raises(ValueError, match=r"batch_size 32 is larger than the dataset \(20 examples"):
        pretrain_batches(numbered, batch_size=32, img_size=16, seed=0)
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        pretrain_batches(numbered, batch_size=8, img_size=16, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index < process_count"):
        pretrain_batches(
            numbered, batch_size=8, img_size=16, seed=0, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match="unknown augmentation 'bogus'"):
        pretrain_batches(numbered, batch_size=8, img_size=16, seed=0, aug="bogus")
    with pytest.raises(ValueError, match="start_step"):
        pretrain_batches(numbered, batch_size=8, img_size=16, seed=0, start_step=-1)


# ---------------------------------------------------------------------------
# Evaluation stream


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once(numbered, process_count):
    batches = [
        list(
            eval_batches(
                numbered, batch_size=8, img_size=16, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    assert [len(b) for b in batches] == [3] * process_count  # ceil(20 / 8), same on every host.
    joined = [
        {key: np.concatenate([host[i][key] for host in batches]) for key in batches[0][i]}
        for i in range(3)
    ]
    assert joined[0]["image"].shape == (8, 16, 16, 3) and joined[0]["image"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in joined])
    labels = np.concatenate([b["label"] for b in joined])
    assert mask.dtype == bool and mask.sum() == 20 and not mask[20:].any()
    np.testing.assert_array_equal(labels[mask], np.arange(20))
    expected = normalize(eval_transform(numbered.images[13], 16)).numpy()
    np.testing.assert_allclose(joined[1]["image"][5], expected)
