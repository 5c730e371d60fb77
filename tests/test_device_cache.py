"""The device cache (config.data.cache): crop boxes distributed as the host sampler's, the
resized crop equal to the host pipeline's, flip and colour rates, the index stream, 8 devices
equal 1, the loop's exact resume with the cache built once per run and never checkpointed."""

import importlib.util
import io
import sys
from itertools import product
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from scipy import stats

from scott_jax import loop
from scott_jax.checkpoint import load_state_tree
from scott_jax.config_checks import check_common
from scott_jax.data import augment, cache_build, device_augment, device_cache, pipeline
from scott_jax.data.sources import Source
from scott_jax.errors import ConfigError, DataError
from scott_jax.sharding import make_mesh
from scott_jax.writers import read_metrics

ROOT = Path(__file__).parents[1]


def smooth_image(height, width, seed=0):
    """uint8 [height, width, 3]: gradients plus noise, so every resize tap matters."""
    yy, xx = np.mgrid[:height, :width]
    noise = np.random.default_rng(seed).normal(0, 40, (height, width, 3))
    base = np.stack([yy * 3, xx * 2, yy + xx], -1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def cache_of(images):
    """A DeviceCache of uint8 images (each [h, w, 3], stored as PNG files in memory, so of any
    sizes), built as cache_build does, on the default device."""
    encoded = np.empty(len(images), object)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded[i] = buffer.getvalue()
    source = Source("imgs", "pretrain", encoded, np.zeros(len(images), np.int32), 1)
    return device_cache.DeviceCache(*map(jnp.asarray, cache_build.build(source, side=10_000)))


# --------------------------------------------------------------------------- crop boxes


def host_boxes(height, width, n, scale=(0.2, 1.0)):
    """n boxes of augment.crop_box (TensorFlow's sampler), seeds 0..n-1."""
    seeds = tf.stack([tf.range(n, dtype=tf.int64), tf.fill([n], tf.constant(7, tf.int64))], 1)
    fn = tf.function(lambda s: augment.crop_box(height, width, s, scale))
    return tf.map_fn(fn, seeds, fn_output_signature=tf.int32).numpy()


def device_boxes(height, width, n, scale=(0.2, 1.0), seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    draw = jax.jit(jax.vmap(lambda k: device_cache.crop_box(k, height, width, scale)))
    return np.asarray(draw(keys))


def box_statistics(boxes, height, width):
    """Relative area, log aspect (w / h), and the placement in the free range, per box."""
    top, left, h, w = boxes.T.astype(float)
    place_y = np.where(h < height, top / np.maximum(height - h, 1), 0.5)
    place_x = np.where(w < width, left / np.maximum(width - w, 1), 0.5)
    return {
        "area": h * w / (height * width),
        "log_aspect": np.log(w / h),
        "place_y": place_y,
        "place_x": place_x,
    }


@pytest.mark.parametrize("height, width", [(375, 500), (500, 120)])
def test_crop_boxes_are_distributed_as_the_host_samplers(height, width):
    """Two-sample KS tests (4,000 boxes each) of area, aspect and placement, on a 4:3 image and
    on a thin one where torchvision's fallback fires; a sampler with another scale fails."""
    n = 4000
    host = box_statistics(host_boxes(height, width, n), height, width)
    device = box_statistics(device_boxes(height, width, n), height, width)
    for name in host:
        assert stats.ks_2samp(host[name], device[name]).pvalue > 1e-3, name
    boxes = device_boxes(height, width, n)
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] >= 1)
    assert np.all(boxes[:, 0] + boxes[:, 2] <= height)
    assert np.all(boxes[:, 1] + boxes[:, 3] <= width)
    other = box_statistics(device_boxes(height, width, n, scale=(0.25, 1.0)), height, width)
    assert stats.ks_2samp(host["area"], other["area"]).pvalue < 1e-6  # the test can fail


# --------------------------------------------------------------------------- resize


@pytest.mark.parametrize("size", [16, 48])
def test_resized_crop_equals_the_host_pipelines_for_a_fixed_box(size):
    """device_cache.crop_resize of a box, stored as is or transposed, flipped or not, against
    the host pipeline's augment.resize_window of the same window (then flipped): at most 1 grey
    level apart, on at most 0.1 % of the values (on XLA:CPU they are equal)."""
    image = smooth_image(60, 90)
    cache = cache_of([image, image.transpose(1, 0, 2)])
    assert not bool(cache.transposed[0]) and bool(cache.transposed[1])
    run = jax.jit(device_cache.crop_resize, static_argnums=3)
    for box, flip in product(
        [(5, 7, 30, 40), (0, 0, 60, 90), (10, 20, 12, 9), (3, 50, 57, 40)], (False, True)
    ):
        t, left, h, w = box
        host = augment.resize_window(tf.constant(image[t : t + h, left : left + w]), size)
        host = host.numpy().astype(int)
        stored = run(cache.images[0], cache.transposed[0], jnp.array(box), size, flip)
        tbox = (left, t, w, h)  # the same window of the portrait image
        transposed = run(cache.images[1], cache.transposed[1], jnp.array(tbox), size, flip)
        hostt = augment.resize_window(
            tf.constant(image.transpose(1, 0, 2)[left:][:w, t:][:, :h]), size
        )
        hostt = hostt.numpy().astype(int)
        if flip:
            host, hostt = host[:, ::-1], hostt[:, ::-1]
        for ours, theirs in ((stored, host), (transposed, hostt)):
            diff = np.abs(np.asarray(ours).astype(int) - theirs)
            assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (box, flip, diff.max())


def test_storage_shrinks_only_large_images_and_bounds_the_aspect():
    assert device_cache.stored_shape(375, 500, 448) == (375, 500)
    assert device_cache.stored_shape(500, 750, 448) == (448, 672)
    assert device_cache.stored_shape(1000, 500, 448) == (672, 336)  # aspect 2: longer side cap
    assert device_cache.storage_side(224, None) == 336


# --------------------------------------------------------------------------- views


def views_of(cache, n, aug, crop_scale=(0.2, 1.0), seed=0):
    index = jnp.zeros(n, jnp.int32)
    position = jnp.arange(n, dtype=jnp.int32)
    make = jax.jit(
        lambda c, i, p: device_cache.make_views(
            c, i, p, seed=seed, img_size=16, crop_scale=crop_scale, aug=aug
        )
    )
    return [np.asarray(v) for v in make(cache, index, position)]


def test_flip_and_colour_rates():
    """Whole-image crops of one colourful image: half the views are flipped; a view is left
    without colour change with probability 0.4 + 0.6 * 0.2 * 0.9 * 0.7 = 0.4756 ('diff');
    'same' colours both views alike and 'none' only normalises."""
    n = 800
    cache = cache_of([smooth_image(16, 16, seed=1)])
    plain, plain_target = views_of(cache, n, "none", crop_scale=(1.0, 1.0))
    assert plain is plain_target or np.array_equal(plain, plain_target)
    base = plain[0]
    flipped = np.array([np.array_equal(v, base[:, ::-1]) for v in plain])
    assert np.all(flipped | np.array([np.array_equal(v, base) for v in plain]))
    assert abs(flipped.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
    context, target = views_of(cache, n, "diff", crop_scale=(1.0, 1.0))
    unchanged = np.array(
        [
            np.allclose(c, p, atol=1e-5)
            for c, p in zip(np.concatenate([context, target]), [*plain, *plain], strict=True)
        ]
    )
    p = 0.4 + 0.6 * 0.2 * 0.9 * 0.7
    assert abs(unchanged.mean() - p) < 4 * np.sqrt(p * (1 - p) / (2 * n))
    same_context, same_target = views_of(cache, 64, "same", crop_scale=(1.0, 1.0))
    np.testing.assert_array_equal(same_context, same_target)
    np.testing.assert_array_equal(same_context, context[:64])  # 'same' = 'diff''s context


def test_views_on_8_devices_equal_1_device_and_one_at_a_time_equals_vectorised():
    """The default map here (8 devices) is vectorised; one example at a time (the default on a
    single CPU device) takes the same draws, equal up to float round-off in the resize (a
    value one level off, on at most 0.1 % of the values; equal on XLA:CPU at this size)."""
    assert not device_augment.sequential_by_default()
    cache = cache_of([smooth_image(40, 30, seed=s) for s in range(4)])
    index = np.arange(16, dtype=np.int32) % 4
    position = np.arange(100, 116, dtype=np.int32)
    args = dict(seed=3, img_size=16, crop_scale=(0.2, 1.0), aug="diff")
    make = jax.jit(lambda c, i, p: device_cache.make_views(c, i, p, **args))
    one = make(cache, index, position)
    sequential = jax.jit(lambda c, i, p: device_cache.make_views(c, i, p, sequential=True, **args))(
        cache, index, position
    )
    for ours, theirs in zip(sequential, one, strict=True):
        assert np.mean(np.abs(np.asarray(ours) - np.asarray(theirs)) > 1e-5) <= 1e-3
    mesh = make_mesh()
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    eight = make(
        jax.device_put(cache, replicated),
        jax.device_put(index, data),
        jax.device_put(position, data),
    )
    assert len(eight[0].sharding.device_set) == 8
    chex.assert_trees_all_equal(jax.device_get(one), jax.device_get(eight))


# --------------------------------------------------------------------------- stream, loop


def test_index_stream_has_the_streams_examples_and_resumes(tmp_path):
    """pretrain_indices: the examples of pretrain_batches in the same batches and rows, stream
    positions step * B + row, and a resume at step 3 is the uninterrupted stream's tail."""
    images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    source = Source("numbered", "pretrain", images, np.arange(20, dtype=np.int32), 20)
    kw = dict(batch_size=8, seed=3)
    pixels = pipeline.pretrain_batches(source, img_size=16, **kw)
    refs = pipeline.pretrain_indices(source, **kw)
    stream = [next(refs) for _ in range(6)]
    for step, batch in enumerate(stream):
        np.testing.assert_array_equal(batch["label"], next(pixels)["label"])
        np.testing.assert_array_equal(batch["context"][:, 0], batch["label"])
        np.testing.assert_array_equal(batch["context"][:, 1], step * 8 + np.arange(8))
        assert batch["target"] is batch["context"] and batch.keys() == {
            "context",
            "target",
            "label",
        }
    resumed = pipeline.pretrain_indices(source, start_step=3, **kw)
    for batch in stream[3:]:
        np.testing.assert_array_equal(next(resumed)["context"], batch["context"])
    host = pipeline.pretrain_indices(source, process_index=1, process_count=2, **kw)
    np.testing.assert_array_equal(next(host)["context"], stream[0]["context"][4:])


def test_config_checks_and_the_budget():
    config = loop_config("unused")
    check_common(config, 8)
    for field, value in (("cache", "gpu"), ("cache_size", 0), ("cache_max_gb", 0.0)):
        bad = loop_config("unused")
        bad.data[field] = value
        with pytest.raises(ConfigError, match=f"data.{field}"):
            check_common(bad, 8)
    bad = loop_config("unused")
    bad.data.aug = "moca"
    with pytest.raises(ConfigError, match="moca"):
        check_common(bad, 8)
    source = Source("big", "pretrain", np.zeros((4, 32, 48, 3), np.uint8), np.zeros(4, np.int32), 1)
    kw = dict(img_size=16, cache_size=None, budget_gb=1e-6, mesh=make_mesh())
    with pytest.raises(DataError, match=r"'big' \(4 images\).*cache=none"):
        cache_build.load_device_cache(source, mode="device", **kw)
    assert cache_build.load_device_cache(source, mode="auto", **kw) is None
    assert cache_build.load_device_cache(source, mode="none", **kw) is None


def image_folder(root: Path, count=40):
    """count JPEGs of mixed sizes (landscape, portrait, larger than the storage size)."""
    shapes = [(90, 120), (120, 90), (200, 300), (64, 64)]
    for i in range(count):
        h, w = shapes[i % len(shapes)]
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(h, w, seed=i)).save(folder / f"{i}.jpg", quality=90)
    return f"folder:{root}"


def loop_config(data_name):
    spec = importlib.util.spec_from_file_location("test_loop", ROOT / "tests" / "test_loop.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tests"))
    config = module.tiny_config(**{"data.cache": "device", "data.aug": "diff"})
    config.data.name = data_name
    config.checkpoint_every_steps = 100
    config.num_epochs = 3
    return config


@pytest.mark.slow
def test_cached_run_resumes_exactly_builds_once_and_checkpoints_no_images(tmp_path, monkeypatch):
    """A folder of 40 JPEGs (2 steps per epoch at batch 16): 5 steps uninterrupted, and 3 + 2
    resumed, take the same losses and end in the same state; each run builds the cache once
    (not per epoch) and its checkpoints hold the train state only."""
    config = loop_config(image_folder(tmp_path / "data"))
    builds = []
    real_build = cache_build.build
    monkeypatch.setattr(
        cache_build, "build", lambda *a, **k: builds.append(1) or real_build(*a, **k)
    )
    full = loop.train_and_evaluate(config, tmp_path / "full", stop_at_step=5).state
    assert len(builds) == 1
    loop.train_and_evaluate(config, tmp_path / "resumed", stop_at_step=3)
    resumed = loop.train_and_evaluate(config, tmp_path / "resumed", stop_at_step=5).state
    assert len(builds) == 3
    losses = [
        {r["step"]: r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r}
        for run in ("full", "resumed")
    ]
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        np.testing.assert_allclose(losses[1][step], losses[0][step], rtol=1e-6)
    chex.assert_trees_all_close(jax.device_get(resumed), jax.device_get(full), atol=1e-6)
    assert not any(x.dtype == np.uint8 for x in jax.tree.leaves(full))
    on_disk = load_state_tree(tmp_path / "full" / "checkpoints")  # the cache is uint8
    assert not any(np.asarray(x).dtype == np.uint8 for x in jax.tree.leaves(on_disk))
    cache_size = 40 * 96 * 144 * 3  # side 96 at 64 px: the 200x300 images are stored at 96x144
    assert sum(np.asarray(x).size for x in jax.tree.leaves(on_disk)) < cache_size
