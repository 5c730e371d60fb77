"""Colour augmentation, two views and the eval transform (docs/design.md#augmentation).

Every op is checked eagerly and inside tf.data, against PIL (the reference's torchvision
transforms run on PIL images) where the arithmetic is deterministic, and by statistics over
many seeds where it is random.
"""

import colorsys

import numpy as np
import pytest
import tensorflow as tf

from scott_jax.data import augment
from scott_jax.data.augment import (
    color_augment,
    color_jitter,
    eval_transform,
    gaussian_blur,
    random_grayscale,
    two_views,
)
from scott_jax.data.augment_spec import AUGMENTATIONS, check_aug

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8)  # One size: XLA compiles once.


def batched_map(fn, n):
    """fn(i) for i in range(n), stacked, run inside tf.data (the way the pipeline runs ops)."""
    return tf.nest.map_structure(np.asarray, next(iter(tf.data.Dataset.range(n).map(fn).batch(n))))


def pil_reference():
    return pytest.importorskip("PIL.Image"), pytest.importorskip("PIL.ImageEnhance")


# ---------------------------------------------------------------------------
# Every random op: eager == tf.data, deterministic, seed-dependent

OPS = {
    "color_jitter": color_jitter,
    "random_grayscale": lambda image, seed: random_grayscale(image, seed, p=0.5),
    "gaussian_blur": gaussian_blur,
    "color_augment": color_augment,
}


@pytest.mark.parametrize("name", OPS)
def test_op_eager_equals_tf_data_and_depends_on_seed(name):
    op = OPS[name]
    image = tf.constant(NOISE)
    eager = np.stack([op(image, [5, i]).numpy() for i in range(8)])
    in_graph = batched_map(lambda i: op(image, tf.stack([tf.constant(5, tf.int64), i])), 8)
    assert eager.shape == (8, 24, 24, 3) and eager.dtype == np.uint8
    np.testing.assert_array_equal(eager, in_graph)
    np.testing.assert_array_equal(op(image, [5, 3]), eager[3])  # Deterministic.
    assert len({out.tobytes() for out in eager}) >= 2  # Other seeds, other draws.


# ---------------------------------------------------------------------------
# Jitter: PIL arithmetic and torchvision's factor ranges


@pytest.mark.parametrize("factor", [0.6, 0.93, 1.0, 1.37])
def test_brightness_contrast_saturation_equal_pil(factor):
    """PIL ImageEnhance (blend truncated to uint8), byte for byte, as torchvision calls it."""
    image_lib, enhance = pil_reference()
    pil = image_lib.fromarray(NOISE)
    x = tf.constant(NOISE, tf.float32)
    f = tf.constant(np.float32(factor), tf.float64)  # A float32 draw, passed as float64.
    for ours, theirs in [
        (augment._brightness, enhance.Brightness),
        (augment._contrast, enhance.Contrast),
        (augment._saturation, enhance.Color),
    ]:
        np.testing.assert_array_equal(ours(x, f), np.array(theirs(pil).enhance(factor)))


def test_hue_and_grayscale_equal_pil():
    """torchvision's PIL adjust_hue (uint8 HSV, hue += int(h * 255) mod 256) on 65,536 colours,
    and PIL's convert('L') for grayscale."""
    image_lib, _ = pil_reference()
    colours = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    colours[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0]] + [[0, 0, 255]] * 4
    x = tf.constant(colours, tf.float32)
    for shift in [-0.1, -0.031, 0.0, 0.07]:
        h, s, v = image_lib.fromarray(colours).convert("HSV").split()
        hue = np.array(h, np.uint8) + np.uint8(int(shift * 255) % 256)  # Wraps around.
        hsv = image_lib.merge("HSV", (image_lib.fromarray(hue, "L"), s, v))
        np.testing.assert_array_equal(
            augment._shift_hue(x, tf.constant(np.float32(shift), tf.float64)),
            np.array(hsv.convert("RGB")),
        )
    luma = np.array(image_lib.fromarray(colours).convert("L"))
    np.testing.assert_array_equal(augment._grayscale(x), np.stack([luma] * 3, -1))


def jitter_only(image, n, **strength):
    """color_jitter with only the named sub-op, over seeds 0..n-1, in tf.data."""
    kwargs = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0) | strength
    return batched_map(lambda i: color_jitter(image, tf.stack([i, 11]), **kwargs), n)


def test_brightness_factor_is_uniform_in_0_6_to_1_4():
    out = jitter_only(np.full((8, 8, 3), 150, np.uint8), 500, brightness=0.4)
    assert np.all(out == out[:, :1, :1, :1])  # A scale of the constant image, nothing else.
    ratio = out[:, 0, 0, 0] / 150  # floor(150 b) / 150
    assert ratio.min() >= 0.6 and ratio.max() <= 1.4
    assert ratio.min() < 0.62 and ratio.max() > 1.38 and abs(ratio.mean() - 1.0) < 0.03


def test_hue_shift_of_pure_red_stays_within_a_tenth_of_a_turn():
    out = jitter_only(np.array([[[255, 0, 0]]], np.uint8), 500, hue=0.1)[:, 0, 0] / 255
    hsv = np.array([colorsys.rgb_to_hsv(*rgb) for rgb in out])
    turns = (hsv[:, 0] + 0.5) % 1.0 - 0.5  # Signed, red = 0.
    # torchvision shifts by int(h * 255) / 256 of a turn, |h| <= 0.1; saturation, value stay.
    assert np.abs(turns).max() <= 0.1 + 1e-6
    assert turns.min() < -0.08 and turns.max() > 0.08
    np.testing.assert_allclose(hsv[:, 1:], 1.0)


def test_contrast_blends_with_the_grayscale_mean_not_per_channel_means():
    """Half red, half blue: luma 76 and 29, mean 52.5 -> 53 (PIL rounds). Green is 0 everywhere,
    so per-channel means (tf.image.adjust_contrast) would keep it 0; PIL's one gray mean lifts
    it to floor(53 (1 - c)) when c < 1."""
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :, 0] = 255
    image[2:, :, 2] = 255
    out = augment._contrast(tf.constant(image, tf.float32), tf.constant(0.5, tf.float64))
    np.testing.assert_array_equal(out[..., 1], np.full((4, 4), np.floor(53 * 0.5)))
    np.testing.assert_array_equal(out[0, 0], np.floor(53 + 0.5 * (np.array([255, 0, 0]) - 53)))
    # Through the public op: c ~ U[0.6, 1.4], so green rises in about half of the draws.
    green = jitter_only(image, 400, contrast=0.4)[:, 0, 0, 1]
    assert green.max() == np.floor(53 * 0.4) and 0.4 < np.mean(green > 0) < 0.6


def test_random_order_is_uniform():
    """Each of the 3! orders about equally often: op i appends digit i."""
    ops = [lambda y, i=i: 10 * y + i + 1 for i in range(3)]
    orders = batched_map(
        lambda i: augment._in_random_order(tf.constant(0), ops, tf.stack([i, 3])), 1200
    )
    assert set(orders) == {123, 132, 213, 231, 312, 321}
    counts = np.unique(orders, return_counts=True)[1]
    assert np.all(np.abs(counts / 1200 - 1 / 6) < 0.04)


# ---------------------------------------------------------------------------
# Grayscale and blur


def test_random_grayscale_uses_601_luma_with_probability_p():
    gray = random_grayscale(tf.constant(NOISE), [0, 0], p=1.0).numpy().astype(int)
    assert np.all(gray == gray[..., :1])
    luma = NOISE.astype(float) @ [0.299, 0.587, 0.114]
    assert np.abs(gray[..., 0] - luma).max() <= 0.5 + 1e-3  # ITU-R 601-2, rounded.
    image = tf.constant(NOISE[:4, :4])
    out = batched_map(lambda i: random_grayscale(image, tf.stack([i, 1])), 2000)
    is_gray = np.all(out == out[..., :1], axis=(1, 2, 3))
    assert np.all(is_gray | np.all(out == NOISE[:4, :4], axis=(1, 2, 3)))
    assert abs(is_gray.mean() - 0.1) < 0.02


def numpy_blur(image, sigma, mode="reflect"):
    """torchvision's GaussianBlur in float64: 9x9 outer-product kernel, padding ``mode``."""
    x = np.arange(9) - 4.0
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k2 = np.outer(k, k) / k.sum() ** 2
    p = np.pad(image.astype(float), [(4, 4), (4, 4), (0, 0)], mode=mode)
    h, w = image.shape[:2]
    return sum(k2[i, j] * p[i : i + h, j : j + w] for i in range(9) for j in range(9))


def test_gaussian_kernel_is_normalised_and_symmetric():
    kernel = augment._gaussian_kernel(9, 1.3).numpy()
    np.testing.assert_allclose(kernel.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kernel, kernel[::-1])
    pdf = np.exp(-0.5 * ((np.arange(9) - 4) / 1.3) ** 2)
    np.testing.assert_allclose(kernel, pdf / pdf.sum(), rtol=1e-6)
    assert np.argmax(kernel) == 4


@pytest.mark.parametrize("sigma", [0.1, 0.6, 2.0])
def test_blur_equals_torchvision_with_reflect_padding(sigma):
    x = tf.constant(NOISE, tf.float32)
    ours = augment._gaussian_filter(x, tf.constant(sigma), 9).numpy()
    exact = numpy_blur(NOISE, sigma)
    # Same sum, other order: a value within float error of .5 may round the other way.
    assert np.abs(ours - exact).max() <= 0.5 + 1e-3
    assert np.mean(ours != np.round(exact)) < 0.002
    # Reflect padding (the edge pixel is not repeated): a spike on row 1 reaches row 0 twice.
    spike = np.zeros((24, 24, 3), np.uint8)
    spike[1, 10] = 255
    out = augment._gaussian_filter(tf.constant(spike, tf.float32), tf.constant(1.0), 9).numpy()
    np.testing.assert_array_equal(out, np.round(numpy_blur(spike, 1.0)))
    assert out[0, 10, 0] != np.round(numpy_blur(spike, 1.0, "symmetric")[0, 10, 0])


def test_blur_keeps_constants_and_smooths_noise():
    flat = tf.constant(np.full((24, 24, 3), 137, np.uint8))
    blurred = batched_map(lambda i: gaussian_blur(flat, tf.stack([i, 2])), 50)
    assert np.all(blurred == 137)
    noise = tf.constant(NOISE)
    variance = batched_map(lambda i: gaussian_blur(noise, tf.stack([i, 2])), 200).var(axis=(1, 2))
    # sigma ~ U[0.1, 2]: from no visible change (sigma < ~0.28) to a strong smoothing.
    assert np.all(variance <= NOISE.var(axis=(0, 1)) + 1)
    assert variance.min() < 0.1 * NOISE.var() and np.mean(variance > 0.99 * NOISE.var()) < 0.15


# ---------------------------------------------------------------------------
# The reference's colour augmentation per view (`TransformsPipeline`)


def blur_visible_fraction():
    """P(sigma ~ U[0.1, 2] moves the pixel next to a 0 | 255 step by at least one level)."""
    sigmas = np.linspace(0.1, 2.0, 19001)[:, None]
    pdf = np.exp(-0.5 * (np.arange(-4, 5) / sigmas) ** 2)  # [S, 9]
    tail = pdf[:, 5:].sum(1) / pdf.sum(1)  # The weight reaching across the step.
    return np.mean(255 * tail > 0.5)


def test_color_augment_marginal_frequencies():
    """2,000 draws on a probe image: top half the colour (200, 100, 50), bottom half a gray 0|255
    step. Grayscale makes the colour gray; jitter changes it (blur cannot: it is constant far
    from the step); blur adds levels to the step (jitter and grayscale map levels to levels).
    Expected per view: grayscale 0.06; jitter without grayscale 0.6 * 0.8 * 0.9 = 0.432;
    visible blur 0.18 * P(sigma above ~0.28); no change 0.4 + 0.6 * 0.2 * 0.9 * P(no visible blur).
    """
    image = np.zeros((24, 24, 3), np.uint8)
    image[:12] = [200, 100, 50]
    image[12:, 12:] = 255
    out = batched_map(lambda i: color_augment(tf.constant(image), tf.stack([i, 9])), 2000)
    colour = out[:, 2, 12].astype(int)
    gray = np.all(colour == colour[:, :1], axis=1)
    changed = np.any(colour != [200, 100, 50], axis=1)
    blurred = np.array([len(np.unique(row)) > 2 for row in out[:, 20, :, 0]])
    unchanged = np.all(out == image, axis=(1, 2, 3))
    visible = blur_visible_fraction()
    assert 0.88 < visible < 0.92
    assert abs(gray.mean() - 0.06) < 0.02
    assert abs((changed & ~gray).mean() - 0.432) < 0.04
    assert abs(blurred.mean() - 0.18 * visible) < 0.03
    assert abs(unchanged.mean() - (0.4 + 0.6 * 0.2 * 0.9 * (1 - 0.3 * visible))) < 0.04
    assert np.all(gray <= changed)


# ---------------------------------------------------------------------------
# Two views ('none' / 'same' / 'diff' / 'reference') and the eval transform

IMAGE = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def all_views():
    """{aug: (context, target)} for seeds 0..23, in one tf.data pipeline: float32
    [24, 24, 24, 3] each (the size of NOISE, so that XLA compiles nothing new)."""
    batch = batched_map(
        lambda i: {
            aug: two_views(IMAGE, tf.stack([i, 4]), size=24, aug=aug) for aug in AUGMENTATIONS
        },
        24,
    )
    return {aug: tuple(views) for aug, views in batch.items()}


def test_two_views_shapes_and_uncoloured_view(all_views):
    context, target = all_views["none"]
    assert context.shape == target.shape == (24, 24, 24, 3) and context.dtype == np.float32
    np.testing.assert_array_equal(context, target)  # 'none': one view twice.
    pixels = (context * augment.IMAGENET_STD + augment.IMAGENET_MEAN) * 255
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)  # Normalised uint8.
    assert len({view.tobytes() for view in context}) == 24  # A crop and flip per seed.


def test_same_shares_one_colour_draw(all_views):
    plain = all_views["none"][0]
    context, target = all_views["same"]
    np.testing.assert_array_equal(context, target)
    coloured = np.any(context != plain, axis=(1, 2, 3))
    assert 4 <= coloured.sum() <= 20  # ~52 % of the views get colour ops.


def test_diff_draws_each_view_independently_and_reference_is_diff(all_views):
    plain = all_views["none"][0]
    context, target = all_views["diff"]
    np.testing.assert_array_equal(context, all_views["same"][0])  # Context seed as in 'same'.
    coloured = np.any(np.stack([context, target]) != plain, axis=(2, 3, 4))  # [2, n]
    assert np.any(coloured[0] & ~coloured[1]) and np.any(coloured[1] & ~coloured[0])
    assert np.any(coloured[0] & coloured[1] & np.any(context != target, axis=(1, 2, 3)))
    for ours, theirs in zip(all_views["reference"], all_views["diff"], strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_two_views_eager_equals_tf_data(all_views):
    for i in (0, 5):
        context, target = two_views(IMAGE, [i, 4], size=24, aug="diff")
        np.testing.assert_array_equal(context, all_views["diff"][0][i])
        np.testing.assert_array_equal(target, all_views["diff"][1][i])


def test_unknown_augmentation_lists_the_choices():
    with pytest.raises(ValueError, match="known: none, same, diff, reference"):
        check_aug("different")
    with pytest.raises(ValueError, match="unknown augmentation 'Same'"):
        two_views(IMAGE, [0, 0], size=24, aug="Same")


def test_eval_transform_centre_crops_a_wide_image():
    """60 x 90, thirds red | green | blue -> shorter side 73 (64 * 256 / 224), centre 64 x 64:
    green in the middle, as many red columns on the left as blue ones on the right."""
    image = np.zeros((60, 90, 3), np.uint8)
    for third in range(3):
        image[:, 30 * third : 30 * (third + 1), third] = 255
    out = eval_transform(tf.constant(image), 64).numpy()
    in_graph = batched_map(lambda i: eval_transform(tf.constant(image), 64), 1)[0]
    np.testing.assert_array_equal(out, in_graph)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    dominant = np.argmax(out[32].astype(int), axis=-1)
    assert dominant[32] == 1 and dominant[0] == 0 and dominant[-1] == 2
    assert abs(np.sum(dominant == 0) - np.sum(dominant == 2)) <= 1


# ---------------------------------------------------------------------------
# MOCA's two views (valeoai/MOCA `util/transforms.py`)


def test_solarize_equals_pil():
    image_module = pytest.importorskip("PIL.Image")
    ops = pytest.importorskip("PIL.ImageOps")
    expected = np.asarray(ops.solarize(image_module.fromarray(NOISE)))
    np.testing.assert_array_equal(augment.solarize(NOISE).numpy(), expected)


def test_moca_colour_op_rates():
    """2,000 draws per view on the probe image of the colour test (colour top half, gray
    0|255 step bottom right): grayscale 0.2; blur visible on 1.0 / 0.1 of the first / second
    view (times P(sigma moves the step), here with 13 taps); solarize (dark colour channels
    become bright) 0 / 0.2 of the views."""
    image = np.zeros((24, 24, 3), np.uint8)
    image[:12] = [200, 100, 50]
    image[12:, 12:] = 255
    out = batched_map(
        lambda i: tf.stack(
            [augment.moca_colour(tf.constant(image), tf.stack([i, 5]), v) for v in (0, 1)]
        ),
        2000,
    )
    sigmas = np.linspace(0.1, 2.0, 19001)[:, None]
    pdf = np.exp(-0.5 * (np.arange(-6, 7) / sigmas) ** 2)
    visible = np.mean(255 * pdf[:, 7:].sum(1) / pdf.sum(1) > 0.5)
    for view, (blur_p, solarize_p) in enumerate(((1.0, 0.0), (0.1, 0.2))):
        x = out[:, view]
        colour = x[:, 2, 12].astype(int)
        gray = np.all(colour == colour[:, :1], axis=1)
        blurred = np.array([len(np.unique(row)) > 2 for row in x[:, 20, :, 0]])
        # The step's bright side (255) ends below 128 under solarize (v >= 128 -> 255 - v);
        # jitter alone rarely takes it that low.
        solarized = x[:, 20, 23, 0] < 128
        assert abs(gray.mean() - 0.2) < 0.03
        assert abs(blurred.mean() - blur_p * visible) < 0.03
        assert abs(solarized.mean() - solarize_p) < 0.03


def test_moca_views_crop_each_view_on_its_own():
    views = batched_map(
        lambda i: augment.two_views(IMAGE, tf.stack([i, 4]), size=24, aug="moca"), 8
    )
    first, second = views
    assert first.shape == second.shape == (8, 24, 24, 3) and first.dtype == np.float32
    # Undo the colour ops' effect on the geometry check: views of a crop differ in content.
    assert not np.allclose(first, second)
    again = batched_map(
        lambda i: augment.two_views(IMAGE, tf.stack([i, 4]), size=24, aug="moca"), 8
    )
    np.testing.assert_array_equal(first, again[0])
