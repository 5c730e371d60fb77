"""The colour augmentation in JAX (``device_augment``) against the TensorFlow ops (``augment``).

Op by op on the same inputs and parameters (the TF ops equal PIL, see test_augment.py), and by
the statistics of many draws, since the two draw from different random generators.
"""

import colorsys
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from scott_jax.data import augment, device_augment
from scott_jax.data.augment_spec import AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD

RNG = np.random.default_rng(1)
NOISE = RNG.integers(0, 256, (24, 24, 3)).astype(np.float32)
#: 65,536 random colours, as a 256 x 256 image.
COLOURS = RNG.integers(0, 256, (256, 256, 3)).astype(np.float32)


def pixels(views) -> np.ndarray:
    """Normalised views -> the pixel values they came from (rounded)."""
    return np.round((np.asarray(views) * IMAGENET_STD + IMAGENET_MEAN) * 255.0)


def assert_close_to_tf(ours, theirs, max_fraction: float):
    """Equal up to one level, and unequal on at most ``max_fraction`` of the values."""
    diff = np.abs(np.asarray(ours) - np.asarray(theirs))
    assert diff.max() <= 1 and np.mean(diff > 0) <= max_fraction


# ---------------------------------------------------------------------------
# Op by op: the TF (= PIL) arithmetic


@pytest.mark.parametrize("factor", [0.6137, 0.8312, 1.3719])
@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blends_equal_tf(name, factor):
    """float32 products (the TF ops round a float64 one) and XLA's FMA may move a pixel whose
    exact value sits on an integer by one level; that is rare for a drawn factor."""
    ours = jax.jit(getattr(device_augment, f"adjust_{name}"))(COLOURS, factor)
    theirs = getattr(augment, f"_{name}")(COLOURS, tf.constant(np.float32(factor), tf.float64))
    assert_close_to_tf(ours, theirs, max_fraction=1e-3)


def test_contrast_mean_is_the_rounded_luma_mean():
    image = np.zeros((24, 24, 3), np.float32)
    image[:12, :, 0] = 255  # luma 76 / 0: mean 38
    out = np.asarray(device_augment.adjust_contrast(image, 0.5))
    assert out[20, 0, 1] == 19 and out[0, 0, 0] == np.floor(38 + 0.5 * (255 - 38))


@pytest.mark.parametrize("shift", [-0.0713, 0.0, 0.0391])
def test_hue_is_tf_hue_but_for_rare_steps(shift):
    """PIL's uint8 HSV round trip; float32 where PIL (and the TF op) use doubles puts ~0.1 % of
    colours one hue step (1/256 turn) off, a few levels in one channel."""
    ours = np.asarray(jax.jit(device_augment.adjust_hue)(COLOURS, shift))
    theirs = augment._shift_hue(COLOURS, tf.constant(np.float32(shift), tf.float64)).numpy()
    off = np.any(ours != theirs, axis=-1)
    assert np.mean(off) < 0.004 and np.abs(ours - theirs).max() <= 8
    # The shift itself: pure red moves by int(shift * 255) / 256 of a turn.
    red = np.asarray(device_augment.adjust_hue(np.array([[[255.0, 0, 0]]]), shift))[0, 0]
    turns = colorsys.rgb_to_hsv(*(red / 255))[0]
    assert abs((turns + 0.5) % 1 - 0.5 - int(shift * 255) / 256) < 0.01


def test_grayscale_equals_tf():
    ours = device_augment.grayscale(COLOURS)
    np.testing.assert_array_equal(ours, augment._grayscale(COLOURS).numpy())
    assert np.all(np.asarray(ours) == np.asarray(ours)[..., :1])


@pytest.mark.parametrize("sigma", [0.1, 0.77, 2.0])
def test_blur_equals_tf(sigma):
    ours = jax.jit(device_augment.gaussian_filter)(NOISE, sigma)
    theirs = augment._gaussian_filter(NOISE, tf.constant(sigma, tf.float32), 9).numpy()
    assert_close_to_tf(ours, theirs, max_fraction=1e-2)
    with pytest.raises(ValueError, match="larger than 4 px"):
        device_augment.gaussian_filter(NOISE[:4], sigma)


# ---------------------------------------------------------------------------
# Two views and the statistics of the draws

#: A probe image (as in test_augment.py): top half the colour (200, 100, 50), bottom half a gray
#: 0|255 step. Grayscale makes the colour gray; jitter changes it; blur adds levels to the step.
PROBE = np.zeros((24, 24, 3), np.uint8)
PROBE[:12] = [200, 100, 50]
PROBE[12:, 12:] = 255
DRAWS = 1000
BATCH = jnp.asarray(np.broadcast_to(PROBE, (DRAWS, *PROBE.shape)))
#: One jitted function for all tests: each (aug, sharding) compiles once.
TWO_VIEWS = jax.jit(device_augment.two_views, static_argnums=2)


@pytest.fixture(scope="module")
def views():
    """{aug: (context, target)} of the probe image repeated DRAWS times, one key."""
    out = {aug: TWO_VIEWS(BATCH, jax.random.key(3), aug) for aug in AUGMENTATIONS}
    return {aug: tuple(np.asarray(v) for v in pair) for aug, pair in out.items()}


def test_two_views_contract(views):
    context, target = views["none"]
    assert context.shape == target.shape == (DRAWS, 24, 24, 3) and context.dtype == np.float32
    np.testing.assert_array_equal(pixels(context), np.broadcast_to(PROBE, context.shape))
    np.testing.assert_allclose(context[0], augment.normalize(PROBE).numpy(), atol=1e-5)
    np.testing.assert_array_equal(*views["same"])
    diff_context, diff_target = views["diff"]
    np.testing.assert_array_equal(diff_context, views["same"][0])  # Context key as in 'same'.
    assert np.mean(np.any(diff_context != diff_target, axis=(1, 2, 3))) > 0.5
    for ours, theirs in zip(views["reference"], views["diff"], strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_two_views_depends_on_the_key_and_checks_input(views):
    other = np.asarray(TWO_VIEWS(BATCH, jax.random.key(4), "diff")[1])
    np.testing.assert_array_equal(TWO_VIEWS(BATCH, jax.random.key(3), "diff")[1], views["diff"][1])
    assert np.mean(np.any(other != views["diff"][1], axis=(1, 2, 3))) > 0.5
    with pytest.raises(ValueError, match="unknown augmentation"):
        device_augment.two_views(BATCH, jax.random.key(0), "bogus")
    with pytest.raises(ValueError, match=r"\[B, S, S, 3\]"):
        device_augment.two_views(BATCH[0], jax.random.key(0), "diff")


def test_marginal_frequencies_match_the_tf_augmentation(views):
    """The expected rates of test_augment.py's TF test (grayscale 0.06, jitter without
    grayscale 0.432, visible blur 0.18 * P(visible), no change 0.4 + 0.6 * 0.2 * 0.9 * ...),
    measured on 2,000 views, and the TF op's own rates from the same probe."""
    out = pixels(np.concatenate(views["diff"])).astype(int)
    colour = out[:, 2, 12]
    gray = np.all(colour == colour[:, :1], axis=1)
    changed = np.any(colour != [200, 100, 50], axis=1)
    blurred = np.array([len(np.unique(row)) > 2 for row in out[:, 20, :, 0]])
    unchanged = np.all(out == PROBE, axis=(1, 2, 3))
    visible = 0.9  # P(sigma ~ U[0.1, 2] moves the pixel next to the step), test_augment.py.
    assert abs(gray.mean() - 0.06) < 0.02
    assert abs((changed & ~gray).mean() - 0.432) < 0.04
    assert abs(blurred.mean() - 0.18 * visible) < 0.03
    assert abs(unchanged.mean() - (0.4 + 0.6 * 0.2 * 0.9 * (1 - 0.3 * visible))) < 0.04
    assert np.all(gray <= changed)


def test_pixel_statistics_match_tf(views):
    """The mean and spread of the coloured half of the probe over 2,000 views agree with the
    TF augmentation's over as many draws (they differ by ~2 levels between generators)."""
    ours = pixels(np.concatenate(views["diff"]))[:, :12].reshape(-1, 3)
    image = tf.constant(PROBE)
    theirs = (
        tf.data.Dataset.range(2 * DRAWS)
        .map(lambda i: augment.color_augment(image, tf.stack([i, 11]))[:12])
        .batch(2 * DRAWS)
        .get_single_element()
        .numpy()
        .reshape(-1, 3)
        .astype(np.float64)
    )
    np.testing.assert_allclose(ours.mean(0), theirs.mean(0), atol=3.0)
    np.testing.assert_allclose(ours.std(0), theirs.std(0), rtol=0.1)


def test_one_example_at_a_time_equals_vectorised(views):
    """two_views one example at a time (``color_augment``, each random choice a branch: the
    default on a single CPU device) equals it vectorised (the branch-free
    ``color_augment_vectorised``: the default on these 8 devices and on accelerators), on the
    probe and on noise, where a misplaced op shows (it changes ~1 % of the values or more);
    float round-off moves a blurred value by a level here and there (~1e-6 of them)."""
    assert not device_augment.sequential_by_default()
    sequential = jax.jit(device_augment.two_views, static_argnums=(2, 3))
    noise = jnp.asarray(RNG.integers(0, 256, BATCH.shape, dtype=np.uint8))
    key = jax.random.key(3)
    for batch, vectorised in ((BATCH, views["diff"]), (noise, TWO_VIEWS(noise, key, "diff"))):
        for ours, theirs in zip(sequential(batch, key, "diff", True), vectorised, strict=True):
            assert np.mean(np.abs(np.asarray(ours) - np.asarray(theirs)) > 1e-5) < 1e-4


def test_importing_device_augment_does_not_import_tensorflow():
    code = (
        "import sys, scott_jax.data.device_augment; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_two_views_do_not_depend_on_the_sharding(views):
    """Inside a step jitted over a mesh, the views are those of the unsharded call (a
    per-shard draw would change most views)."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    step = jax.jit(device_augment.two_views, static_argnums=2, out_shardings=sharding)
    sharded = step(jax.device_put(BATCH, sharding), jax.random.key(3), "diff")
    for ours, theirs in zip(sharded, views["diff"], strict=True):
        # The same draws; another compilation may round a boundary pixel one level (0.017) off.
        diff = np.abs(np.asarray(ours) - theirs)
        assert diff.max() < 0.02 and np.mean(diff > 1e-5) < 1e-4
