"""Our two-view crop against the reference's transforms (issue 22.5; docs/deviations.md).

The official `src/data/transforms.py`, `TransformsPipeline`, runs torchvision's
RandomResizedCrop (bicubic) and RandomHorizontalFlip on PIL images. The colour ops are
checked against PIL in test_augment.py and the flip in test_data.py; here:

- the crop window: the same distribution as torchvision's sampler (`reference_box`, its
  documented algorithm: 10 attempts of area ~ U(scale)·HW and log-uniform aspect, sides
  rounded, a uniform corner, else the centred ratio-clamped image), compared by chi-square
  over the discrete (height, width) and corner distributions of a 32 px digit;
- the bicubic resize of the same window: against PIL's `Image.resize(BICUBIC)`, which
  rounds to uint8 between its horizontal and vertical passes. Ours resizes in one float
  pass and rounds once, so some values land one level off (the deviation row bounds it).
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from scott_jax.data.augment import crop_box, resize_window

SIDE = 32  # the digits' base size (`sources.DIGITS_BASE_SIZE`)
SCALE = (0.6, 1.0)  # configs/digits.py
RATIO = (3 / 4, 4 / 3)
DRAWS = 20_000


def reference_box(rng, height, width, scale=SCALE, ratio=RATIO):
    """torchvision `RandomResizedCrop.get_params`, as documented, with numpy draws."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def chi_square_p(a: np.ndarray, b: np.ndarray) -> float:
    """p-value that two samples of discrete labels come from one distribution (bins with
    fewer than 10 expected counts pooled)."""
    from scipy import stats

    labels, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    counts = np.zeros((2, len(labels)))
    np.add.at(counts[0], inverse[: len(a)], 1)
    np.add.at(counts[1], inverse[len(a) :], 1)
    small = counts.sum(0) < 20
    if small.any():
        counts = np.concatenate([counts[:, ~small], counts[:, small].sum(1, keepdims=True)], 1)
    return float(stats.chi2_contingency(counts)[1])


@pytest.fixture(scope="module")
def boxes():
    ours = next(
        iter(
            tf.data.Dataset.range(DRAWS)
            .map(lambda i: crop_box(SIDE, SIDE, tf.stack([i, 11]), SCALE))
            .batch(DRAWS)
        )
    ).numpy()
    rng = np.random.default_rng(0)
    reference = np.array([reference_box(rng, SIDE, SIDE) for _ in range(DRAWS)])
    return ours, reference


def test_crop_sizes_follow_torchvision(boxes):
    ours, reference = boxes
    size = lambda b: b[:, 2] * 100 + b[:, 3]  # noqa: E731 (height, width) as one label
    assert chi_square_p(size(ours), size(reference)) > 1e-3
    # The test has power: a sampler whose area is uniform in side length instead fails.
    rng = np.random.default_rng(1)
    side = rng.uniform(math.sqrt(SCALE[0]), 1.0, DRAWS) * SIDE
    wrong = np.stack([0 * side, 0 * side, np.round(side), np.round(side)], 1).astype(int)
    assert chi_square_p(size(wrong), size(reference)) < 1e-6


def test_crop_corners_are_uniform_over_the_free_range(boxes):
    ours, reference = boxes
    for b in (ours, reference):
        assert np.all((b[:, 0] + b[:, 2] <= SIDE) & (b[:, 1] + b[:, 3] <= SIDE))

    # The corner relative to its free range, in 4 bins, for windows with room to move.
    def relative(b):
        free = SIDE - b[:, 2:4]
        ok = free.min(1) >= 4
        return np.floor(4 * b[ok, :2] / (free[ok] + 1)).astype(int) @ np.array([4, 1])

    assert chi_square_p(relative(ours), relative(reference)) > 1e-3


def test_bicubic_resize_is_pil_to_one_level(digits_and_photo_windows):
    """Same window, 64 px (digits) or 224 px (photo crops): ~17 % of the values one level
    off PIL, which rounds between passes; rarely more (edges of high contrast)."""
    pil = pytest.importorskip("PIL.Image")
    diffs = []
    for window, size in digits_and_photo_windows:
        ours = resize_window(tf.constant(window), size).numpy().astype(int)
        ref = np.asarray(pil.fromarray(window).resize((size, size), pil.BICUBIC)).astype(int)
        diffs.append(np.abs(ours - ref).ravel())
    d = np.concatenate(diffs)
    assert d.mean() < 0.25, d.mean()
    assert (d > 1).mean() < 1e-3, (d > 1).mean()
    assert d.max() <= 8, d.max()


@pytest.fixture(scope="module")
def digits_and_photo_windows():
    from sklearn.datasets import load_sample_image

    from scott_jax.data.sources import load_source

    images = load_source("digits", "pretrain").images
    windows = []
    for i in range(20):
        top, left, h, w = crop_box(SIDE, SIDE, tf.constant([i, 3], tf.int64), SCALE).numpy()
        windows.append((np.ascontiguousarray(images[i][top : top + h, left : left + w]), 64))
    photo = load_sample_image("flower.jpg")
    for i in range(4):
        top, left, h, w = crop_box(
            *photo.shape[:2], tf.constant([i, 5], tf.int64), (0.2, 1.0)
        ).numpy()
        windows.append((np.ascontiguousarray(photo[top : top + h, left : left + w]), 224))
    return windows
