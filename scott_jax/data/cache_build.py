"""Builds the device cache of a pretraining source (``config.data.cache``; the JAX half is
``device_cache``): every image decoded once, in parallel, at most resized to the storage size,
packed on one canvas and put on every device of the mesh. docs/data.md#the-device-cache.
"""

import io
import logging
import time

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from scott_jax.data import device_cache
from scott_jax.data.sources import Source, decode_image
from scott_jax.errors import DataError

log = logging.getLogger(__name__)

#: Seconds between two progress lines while the cache is built.
_PROGRESS_EVERY_S = 5.0
#: At most this share of a device's memory (when the device reports it) goes to the cache.
DEVICE_MEMORY_SHARE = 0.5


def image_sizes(source: Source) -> np.ndarray:
    """int64 [N, 2]: every image's (height, width), from the file headers (nothing decoded)."""
    if source.storage == "pixels":
        return np.tile(np.asarray(source.images.shape[1:3]), (source.num_examples, 1))
    sizes = np.empty((source.num_examples, 2), np.int64)
    for i, item in enumerate(source.images.tolist()):
        with Image.open(io.BytesIO(item) if source.storage == "encoded" else item) as image:
            sizes[i] = image.size[1], image.size[0]
    return sizes


def plan(source: Source, side: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(every image's (h, w) [N, 2], its stored (h, w) [N, 2], the canvas (Hc, Wc))."""
    originals = image_sizes(source)
    stored = np.array([device_cache.stored_shape(h, w, side) for h, w in originals])
    stored = stored.reshape(-1, 2)
    canvas = (int(stored.min(1).max()), int(stored.max(1).max()))
    return originals, stored, canvas


def check_fits(source: Source, nbytes: int, canvas, side: int, budget_gb: float, device) -> str:
    """'' if a cache of nbytes per device fits the budget, else why not (a sentence)."""
    limit, where = budget_gb * 2**30, f"config.data.cache_max_gb={budget_gb:g}"
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        device_limit = DEVICE_MEMORY_SHARE * stats["bytes_limit"]
        if device_limit < limit:
            limit = device_limit
            where = f"half of the {stats['bytes_limit'] / 2**30:.1f} GiB of a {device.device_kind}"
    if nbytes <= limit:
        return ""
    return (
        f"{source.name!r} ({source.num_examples} images) takes {nbytes / 2**30:.2f} GiB per "
        f"device in the cache (shorter side {side} px, a {canvas[0]}x{canvas[1]} canvas), over "
        f"the budget of {limit / 2**30:.2f} GiB ({where})"
    )


def build(source: Source, side: int, layout=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [N, Hc, Wc, 3], sizes int32 [N, 2], transposed bool [N]) on the host, as
    ``device_cache.DeviceCache`` holds them: each image decoded once (a ``tf.data`` map over
    all cores), resized (antialiased bicubic, rounded as the host pipeline's uint8) only if a
    side exceeds the storage size, a portrait one transposed, placed top-left on the canvas.
    layout: ``plan(source, side)`` when already known."""
    originals, stored, canvas = plan(source, side) if layout is None else layout
    transposed = stored[:, 0] > stored[:, 1]
    image_at = _image_reader(source)
    names = source.images if source.storage == "files" else np.arange(source.num_examples)
    labels = tf.constant(names.astype(str))

    def load(i, original, hw, portrait):
        image = image_at(i)
        check = tf.debugging.Assert(
            tf.reduce_all(tf.shape(image, tf.int64)[:2] == original),
            ["an image decoded to another size than its header says:", tf.gather(labels, i)],
        )
        with tf.control_dependencies([check]):
            image = tf.cond(
                tf.reduce_all(tf.shape(image, tf.int64)[:2] == hw),
                lambda: image,
                lambda: _resize_uint8(image, hw),
            )
        image = tf.cond(portrait, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
        shape = tf.shape(image)
        return tf.pad(image, [[0, canvas[0] - shape[0]], [0, canvas[1] - shape[1]], [0, 0]])

    ds = tf.data.Dataset.from_tensor_slices(
        (np.arange(source.num_examples), originals, stored, transposed)
    )
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(64).prefetch(tf.data.AUTOTUNE)
    images = np.empty((source.num_examples, *canvas, 3), np.uint8)
    start = shown = time.perf_counter()
    done = 0
    for batch in ds.as_numpy_iterator():
        images[done : done + len(batch)] = batch
        done += len(batch)
        now = time.perf_counter()
        if now - shown >= _PROGRESS_EVERY_S or done == source.num_examples:
            rate = done / max(now - start, 1e-9)
            log.info(
                "Caching %s: %d/%d images (%.0f%%), %.0f images/s, ~%.0f s left.",
                source.name,
                done,
                source.num_examples,
                100.0 * done / source.num_examples,
                rate,
                (source.num_examples - done) / max(rate, 1e-9),
            )
            shown = now
    return images, stored.astype(np.int32), transposed


def load_device_cache(
    source: Source,
    *,
    mode: str,
    img_size: int,
    cache_size: int | None,
    budget_gb: float,
    mesh: jax.sharding.Mesh,
) -> device_cache.DeviceCache | None:
    """The source's cache on every device of ``mesh`` (replicated), or None to stream.

    mode: 'device' (refused with a DataError that names the size and the alternatives when it
    is over the budget), 'auto' (the cache on a GPU / TPU when it fits, else None) or 'none'.
    """
    if mode not in device_cache.CACHE_MODES:
        raise ValueError(f"unknown cache mode {mode!r}; known: {device_cache.CACHE_MODES}")
    device = mesh.devices.flat[0]
    if mode == "none" or (mode == "auto" and device.platform == "cpu"):
        return None
    side = device_cache.storage_side(img_size, cache_size)
    layout = plan(source, side)
    canvas = layout[2]
    nbytes = device_cache.cache_bytes(source.num_examples, canvas)
    too_big = check_fits(source, nbytes, canvas, side, budget_gb, device)
    if too_big and mode == "auto":
        log.info("Streaming the input (config.data.cache='auto'): %s.", too_big)
        return None
    if too_big:
        raise DataError(
            f"config.data.cache='device': {too_big}. Stream it instead with "
            "--config.data.cache=none (decodes every epoch on the host), or store smaller "
            "images with --config.data.cache_size=<shorter side, px>, or raise "
            "--config.data.cache_max_gb"
        )
    log.info(
        "Caching %d images of %s on %d device(s): shorter side %d px, %dx%d canvas, %.2f GiB "
        "per device.",
        source.num_examples,
        source.name,
        mesh.size,
        side,
        *canvas,
        nbytes / 2**30,
    )
    start = time.perf_counter()
    images, sizes, transposed = build(source, side, layout)
    replicated = NamedSharding(mesh, P())
    cache = device_cache.DeviceCache(
        *(
            jax.make_array_from_callback(x.shape, replicated, lambda index, x=x: x[index])
            for x in (images, sizes, transposed)
        )
    )
    jax.block_until_ready(cache)
    log.info("Cache built in %.1f s.", time.perf_counter() - start)
    return cache


def _image_reader(source: Source):
    """A function: example index (int64 scalar tensor) -> uint8 [H, W, 3], decoded in full."""
    if source.storage == "pixels":
        images = tf.constant(source.images)
        return lambda i: tf.gather(images, i)
    items = tf.constant(source.images)
    if source.storage == "encoded":
        return lambda i: decode_image(tf.gather(items, i))
    return lambda i: decode_image(tf.io.read_file(tf.gather(items, i)))


def _resize_uint8(image: tf.Tensor, hw: tf.Tensor) -> tf.Tensor:
    """Antialiased bicubic resize to hw, rounded and clipped to uint8 (as ``augment``'s)."""
    resized = tf.image.resize(image, tf.cast(hw, tf.int32), method="bicubic", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
