"""Pretraining from images held in device memory (``config.data.cache='device'``).

The dataset is decoded once at start-up (``cache_build``) into a ``DeviceCache``: every image
resized, at most, to a *storage size* (shorter side ``storage_side``, by default 1.5 times the
training size) and held as uint8 on every device of the mesh (replicated). The host then sends
only example references per step (``pipeline.pretrain_indices``) and the jitted step makes both
views here: the RandomResizedCrop box (``crop_box``, torchvision's distribution, drawn with
``jax.random``), the antialiased bicubic resize of the box (``crop_resize``, TensorFlow's
``scale_and_translate`` arithmetic, which the host pipeline uses), the flip, the colour recipe
(``device_augment``) and the normalisation. Every draw is a function of (seed, the example's
position in the global stream), so a resumed run repeats the uninterrupted one and the views do
not depend on the number of devices or hosts. Details: docs/data.md#the-device-cache.

A cached run's data batch holds, in place of each view ('context', 'target', or 'image' after a
method's ``add_masks`` renames the context view), the int32 [b, 2] references (example index,
stream position); ``with_views`` turns them into the views inside the step, before the method's
step runs, so every method that reads these views works unchanged. This module imports no
TensorFlow.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from scott_jax.data import device_augment
from scott_jax.data.augment_spec import check_aug

#: Values of ``config.data.cache``: 'none' streams (decode every epoch), 'device' caches, 'auto'
#: caches on an accelerator when the dataset fits the budget, and streams otherwise.
CACHE_MODES = ("none", "device", "auto")
#: A cached image's longer side is at most this many times the storage's shorter side (wider
#: images are scaled down further), so that the canvas is storage_side x 1.5 storage_side.
MAX_ASPECT = 1.5
#: Batch entries that hold a view, and which view: 0 the context, 1 the target.
VIEW_KEYS = {"context": 0, "image": 0, "target": 1}
#: torchvision's RandomResizedCrop tries this many (area, ratio) draws before its fallback.
CROP_ATTEMPTS = 10
#: Mixed into the run seed: the device views draw from their own stream.
_VIEWS_STREAM = 0x63616368  # "cach"


class DeviceCache(NamedTuple):
    """The decoded pretraining set, on the devices (a pytree: a jitted argument, never state).

    images: uint8 [N, Hc, Wc, 3], each image's stored pixels in the top-left corner of the
      canvas, zero elsewhere; a portrait image (taller than wide) is stored transposed, so its
      longer side lies along Wc.
    sizes: int32 [N, 2], the stored image's (height, width) in its own orientation.
    transposed: bool [N], whether images[i] holds the transpose of the image.
    """

    images: jax.Array
    sizes: jax.Array
    transposed: jax.Array


def storage_side(img_size: int, cache_size: int | None) -> int:
    """The shorter side images are stored at (never enlarged): ``cache_size``, or 1.5 img_size.

    1.5 x 224 = 336 px on a 336 x 504 canvas: 0.48 MiB an image, so Flowers-102 (3.9 GiB) or
    Pets-37 (3.5 GiB) fit beside the scott-12/16 bf16 batch-128 step (17.6 GiB) on the paper's
    24 GB GPU. The smallest default crop (scale 0.2) of a 4:3 image then spans 174 stored
    pixels, enlarged 1.29x to 224, where a full-resolution decode spans 194 (a 500x375 image)
    to 258 (Flowers' 500x667) pixels; from scale 0.33 up no crop is enlarged. A larger
    ``cache_size`` (448: 231 pixels at scale 0.2) trades memory for those pixels
    (docs/data.md#the-device-cache).
    """
    return (3 * img_size) // 2 if cache_size is None else int(cache_size)


def stored_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) an image of (height, width) is stored at: scaled by min(1, side / shorter side,
    MAX_ASPECT side / longer side), sides rounded, at least 1."""
    scale = min(1.0, side / min(height, width), MAX_ASPECT * side / max(height, width))
    if scale >= 1.0:
        return int(height), int(width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def cache_bytes(num_examples: int, canvas: tuple[int, int]) -> int:
    """Bytes of a cache of num_examples images on a canvas (Hc, Wc), per device."""
    return num_examples * canvas[0] * canvas[1] * 3


def crop_box(
    key: jax.Array,
    height,
    width,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """The RandomResizedCrop window of a (height, width) image, int32 [4] (top, left, h, w).

    ``augment.crop_box`` (torchvision's ``get_params``: up to 10 draws of an area fraction
    ~ U(scale) and a log-uniform aspect ratio, the first that fits placed uniformly, else the
    centred whole image clamped to ``ratio``) with the same float32 arithmetic, drawn from
    ``jax.random`` instead of TensorFlow's stateless ops: the same distribution, not the same
    box for a seed (tests compare the distributions).
    """
    area_key, ratio_key, place_key = jax.random.split(key, 3)
    h = jnp.asarray(height, jnp.float32)
    w = jnp.asarray(width, jnp.float32)
    area = h * w * jax.random.uniform(area_key, (CROP_ATTEMPTS,), minval=scale[0], maxval=scale[1])
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = jnp.exp(
        jax.random.uniform(ratio_key, (CROP_ATTEMPTS,), minval=log_ratio[0], maxval=log_ratio[1])
    )
    crop_w = jnp.round(jnp.sqrt(area * aspect))
    crop_h = jnp.round(jnp.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
    first = jnp.argmax(fits)  # 0 when nothing fits; then the fallback is used
    found = jnp.any(fits)
    in_ratio = w / h
    fallback_w = jnp.where(in_ratio > ratio[1], jnp.round(h * ratio[1]), w)
    fallback_h = jnp.where(in_ratio < ratio[0], jnp.round(w / ratio[0]), h)
    crop_w = jnp.where(found, crop_w[first], fallback_w)
    crop_h = jnp.where(found, crop_h[first], fallback_h)
    # torch.randint(0, H - h + 1) is floor(u * (H - h + 1)) for u ~ U[0, 1).
    u = jax.random.uniform(place_key, (2,))
    top = jnp.where(found, jnp.floor(u[0] * (h - crop_h + 1)), jnp.floor((h - crop_h) / 2))
    left = jnp.where(found, jnp.floor(u[1] * (w - crop_w + 1)), jnp.floor((w - crop_w) / 2))
    top, left = jnp.minimum(top, h - crop_h), jnp.minimum(left, w - crop_w)  # u * n == n
    return jnp.stack([top, left, crop_h, crop_w]).astype(jnp.int32)


def _keys_cubic(x: jax.Array) -> jax.Array:
    """TensorFlow's Keys cubic kernel (a = -0.5, as PIL's bicubic) at |x|."""
    x = jnp.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return jnp.where(x >= 2.0, 0.0, jnp.where(x >= 1.0, far, near))


def resize_weights(start, length, canvas: int, size: int) -> jax.Array:
    """float32 [size, canvas]: the antialiased bicubic resize of canvas[start : start + length]
    to ``size`` samples, as a matrix over the whole canvas axis.

    TensorFlow's ``scale_and_translate`` (what ``tf.image.resize(..., 'bicubic',
    antialias=True)`` runs on the host): output i samples the window at (i + 0.5) length / size
    - 0.5, with the Keys kernel widened by the shrink factor (antialiasing), the taps outside the
    window dropped and the rest normalised to sum 1. ``start`` and ``length`` may be traced.
    """
    length = jnp.asarray(length, jnp.float32)
    inv_scale = length / size
    kernel_scale = jnp.maximum(inv_scale, 1.0)
    sample = (jnp.arange(size, dtype=jnp.float32) + 0.5) * inv_scale  # window coordinates
    source = (jnp.arange(canvas) - start).astype(jnp.float32)
    weights = _keys_cubic((source[None, :] + 0.5 - sample[:, None]) * (1.0 / kernel_scale))
    weights = jnp.where((source >= 0) & (source < length), weights, 0.0)
    total = jnp.sum(weights, axis=1, keepdims=True)
    return weights * (1.0 / jnp.where(total == 0, 1.0, total))


def crop_resize(image: jax.Array, transposed, box: jax.Array, size: int, flip=False) -> jax.Array:
    """One cached image's ``box`` (in the image's own orientation) resized to [size, size, 3]
    pixel floats (rounded and clipped to 0..255 as the host pipeline's uint8), mirrored left to
    right if ``flip``.

    Two matrix products over the canvas (columns, then rows, as TensorFlow: the longer canvas
    axis is contracted first, the cheaper order), with the channels outside the products so
    that each is one [3 Hc, Wc] x [Wc, size] and [size, Hc] x [Hc, 3 size] GEMM, at full
    float32 precision (a TF32 / bf16 pass would move pixels by a level). A transposed image's
    box is transposed onto its storage and the result transposed back; the flip reverses the
    weights of the output's columns (the same products in mirrored order).
    """
    canvas_h, canvas_w = image.shape[0], image.shape[1]
    top, left, height, width = box[0], box[1], box[2], box[3]
    row_start = jnp.where(transposed, left, top)
    row_length = jnp.where(transposed, width, height)
    col_start = jnp.where(transposed, top, left)
    col_length = jnp.where(transposed, height, width)
    rows = resize_weights(row_start, row_length, canvas_h, size)
    cols = resize_weights(col_start, col_length, canvas_w, size)
    # The output's columns come from the storage's rows when it is transposed.
    rows = jnp.where(jnp.logical_and(flip, transposed), rows[::-1], rows)
    cols = jnp.where(jnp.logical_and(flip, jnp.logical_not(transposed)), cols[::-1], cols)
    highest = jax.lax.Precision.HIGHEST
    x = jnp.moveaxis(image, -1, 0).astype(jnp.float32)  # [3, Hc, Wc]
    x = jnp.einsum("chw,xw->chx", x, cols, precision=highest)
    x = jnp.einsum("yh,chx->ycx", rows, x, precision=highest)
    x = jnp.swapaxes(x, 1, 2)  # [size, size, 3]
    x = jnp.where(transposed, jnp.swapaxes(x, 0, 1), x)
    return jnp.round(jnp.clip(x, 0.0, 255.0))


def example_keys(seed: int, positions: jax.Array) -> jax.Array:
    """[b, 4] keys (crop, flip, context colour, target colour) of the examples at these global
    stream positions: functions of (seed, position) only."""
    base = jax.random.fold_in(jax.random.key(seed), _VIEWS_STREAM)
    keys = jax.vmap(lambda p: jax.random.fold_in(base, p))(positions.astype(jnp.uint32))
    return jax.vmap(lambda k: jax.random.split(k, 4))(keys)


def make_views(
    cache: DeviceCache,
    index: jax.Array,
    position: jax.Array,
    *,
    seed: int,
    img_size: int,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    aug: str = "none",
    sequential: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(context, target), float32 [b, img_size, img_size, 3], normalised: the two views of the
    examples ``index`` (int32 [b]) at stream positions ``position`` (int32 [b]).

    Per example: one ``crop_box`` + ``crop_resize`` + flip (p 0.5) shared by both views, then
    each view's colour (``device_augment.color_augment``; ``aug`` as in ``augment.two_views``:
    'none' no colour and one array for both, 'same' one draw for both, 'diff' / 'reference'
    a draw each), then ImageNet normalisation. The examples are mapped with
    ``device_augment.map_examples(..., sequential)``: by default one at a time on a single CPU
    device, vectorised elsewhere; the views are the same either way.
    """
    check_aug(aug)
    if aug == "moca":
        raise ValueError("aug='moca' crops each view on its own: not available from the cache")
    keys = example_keys(seed, position)

    def crop(example):
        i, crop_key, flip_key = example
        box = crop_box(crop_key, cache.sizes[i, 0], cache.sizes[i, 1], crop_scale)
        flip = jax.random.bernoulli(flip_key)
        return crop_resize(cache.images[i], cache.transposed[i], box, img_size, flip)

    views = device_augment.map_examples(crop, (index, keys[:, 0], keys[:, 1]), sequential)
    if aug == "none":
        views = device_augment.normalize(views)
        return views, views
    if aug == "same":
        context = device_augment.color_augment_examples(views, keys[:, 2], sequential)
        context = device_augment.normalize(context)
        return context, context
    # 'diff' and 'reference': both views in one map (one traced copy of the colour ops), each
    # example's two next to each other, so that a sharded batch stays sharded as it is.
    both = jnp.repeat(views, 2, axis=0)
    both = device_augment.color_augment_examples(both, keys[:, 2:].reshape(-1), sequential)
    both = device_augment.normalize(both).reshape(-1, 2, *views.shape[1:])
    return both[:, 0], both[:, 1]


def with_views(batch: dict, cache: DeviceCache, **view_args) -> dict:
    """The batch with each ``VIEW_KEYS`` entry that holds references (int32 [b, 2]: example
    index, stream position) replaced by its view (``make_views(cache, ..., **view_args)``)."""
    refs = [k for k in VIEW_KEYS if k in batch and batch[k].ndim == 2]
    if not refs:
        return batch
    ref = batch[refs[0]]
    views = make_views(cache, ref[:, 0], ref[:, 1], **view_args)
    return {**batch, **{k: views[VIEW_KEYS[k]] for k in refs}}


def cached_step(step, cache: DeviceCache, *, seed: int, img_size: int, crop_scale, aug: str):
    """``step(state, batch)`` (a ``Trainer.step``) for batches of references: a jitted
    (state, batch) -> step(state, with_views(batch, cache)), the state donated. The cache is a
    jitted argument (bound here), not a constant of the program and not part of the state, so
    it is never compiled in nor checkpointed."""
    view_args = dict(seed=seed, img_size=img_size, crop_scale=tuple(crop_scale), aug=aug)

    @functools.partial(jax.jit, donate_argnums=0)
    def views_then_step(state, batch, cache):
        return step(state, with_views(batch, cache, **view_args))

    return functools.partial(views_then_step, cache=cache)
