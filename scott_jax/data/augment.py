"""Image transforms of the reference (SPEC §7.1, §7.2) as TensorFlow ops.

Every op works on one uint8 image [H, W, 3], eagerly or inside ``tf.data`` (tests check both),
and takes all sizes as arguments. Randomness comes only from the ``seed`` argument (an int
[2] tensor) through TensorFlow's *stateless* random ops: an augmentation is a pure function
of (image, seed). The pipeline derives each example's seed from (run seed, position of the
example in the stream), which is what lets a resumed run redraw exactly the augmentations
of the uninterrupted one (``pipeline``).

Image ops return uint8, as the reference's PIL ops do (a bicubic overshoot is clipped and
rounded); only ``normalize`` goes to float32. Colour augmentation (jitter, grayscale, blur;
SPEC §7.1 step 3) is not implemented yet: ``two_views`` knows only ``aug='none'``.
"""

import math

import tensorflow as tf

# TensorFlow is only the input pipeline: keep it off any GPU so that JAX owns the device memory.
if tf.config.get_visible_devices("GPU"):
    tf.config.set_visible_devices([], "GPU")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Values of ``two_views(aug=...)``: the colour augmentation of each view (SPEC §7.1).
AUGMENTATIONS = ("none",)
#: torchvision's RandomResizedCrop tries this many (area, ratio) draws before its fallback.
_CROP_ATTEMPTS = 10


def crop_box(
    height,
    width,
    seed,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """The RandomResizedCrop window, int32 [4] = (top, left, crop_height, crop_width).

    torchvision semantics (``RandomResizedCrop.get_params``): up to 10 attempts, each drawing an
    area fraction ~ U(scale) and an aspect ratio w/h log-uniform in ``ratio``, sides rounded;
    the first attempt that fits in the image is placed uniformly at random. If none fits, the
    whole image clamped to ``ratio`` is centre-cropped. The 10 attempts are drawn at once and
    the first that fits is taken, which has the same distribution as the sequential loop.

    Separate from the resize so that a JPEG source can later decode only the window
    (``tf.image.decode_and_crop_jpeg``), and so that tests can check the window statistics.
    """
    area_seed, ratio_seed, place_seed = tf.unstack(_split(seed, 3))
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    area = h * w * tf.random.stateless_uniform([_CROP_ATTEMPTS], area_seed, scale[0], scale[1])
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(tf.random.stateless_uniform([_CROP_ATTEMPTS], ratio_seed, *log_ratio))
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
    first = tf.argmax(tf.cast(fits, tf.int32))  # 0 when nothing fits; then the fallback is used.
    found = tf.reduce_any(fits)

    in_ratio = w / h
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    crop_w = tf.where(found, crop_w[first], fallback_w)
    crop_h = tf.where(found, crop_h[first], fallback_h)

    # torch.randint(0, H - h + 1) is floor(u * (H - h + 1)) for u ~ U[0, 1).
    u = tf.random.stateless_uniform([2], place_seed)
    top = tf.where(found, tf.floor(u[0] * (h - crop_h + 1)), tf.floor((h - crop_h) / 2))
    left = tf.where(found, tf.floor(u[1] * (w - crop_w + 1)), tf.floor((w - crop_w) / 2))
    return tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)


def random_resized_crop(
    image: tf.Tensor,
    seed,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: a ``crop_box`` window, bicubic-resized.

    SPEC §7.1 step 1. Antialiased like PIL, which the reference resizes with.
    """
    shape = tf.shape(image)
    top, left, crop_h, crop_w = tf.unstack(crop_box(shape[0], shape[1], seed, scale, ratio))
    window = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1]))
    return _resize_uint8(window, (size, size), "bicubic")


def random_flip(image: tf.Tensor, seed) -> tf.Tensor:
    """Horizontal flip with probability 0.5 (SPEC §7.1 step 2); [H, W, C] -> same shape."""
    return tf.image.stateless_random_flip_left_right(image, tf.cast(seed, tf.int64))


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8 [..., 3] in [0, 255] -> float32 (x / 255 - mean) / std, ImageNet stats (SPEC §7.1)."""
    x = tf.cast(image, tf.float32) / 255.0
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def eval_transform(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the test transform (SPEC §7.2).

    torchvision ``Resize(round(size * 256 / 224))`` (shorter side, longer side truncated,
    bilinear, antialiased as PIL), then ``CenterCrop(size)``. At size 224 this is Resize(256),
    CenterCrop(224).
    """
    short_target = tf.constant(round(size * 256 / 224), tf.float64)
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    short = tf.reduce_min(shape)
    new_hw = tf.where(shape == short, short_target, tf.floor(short_target * shape / short))
    new_hw = tf.cast(new_hw, tf.int32)
    resized = _resize_uint8(image, new_hw, "bilinear")
    # torchvision CenterCrop: top = int(round((H - size) / 2)).
    offset = tf.cast(tf.round(tf.cast(new_hw - size, tf.float32) / 2), tf.int32)
    return tf.slice(resized, tf.concat([offset, [0]], 0), [size, size, -1])


def two_views(
    image: tf.Tensor,
    seed,
    *,
    size: int,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    aug: str = "none",
) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 [H, W, 3] -> (context, target), each float32 [size, size, 3], normalised.

    SPEC §7.1 / §6.2: one RandomResizedCrop + flip, shared by both views so they are spatially
    identical; then each view's colour augmentation ``aug`` (none so far: both views are the
    same image); then ImageNet normalisation. views[0] is the context (masked) view, views[1]
    the target view.
    """
    check_aug(aug)
    crop_seed, flip_seed = tf.unstack(_split(seed, 2))
    view = random_flip(random_resized_crop(image, crop_seed, size, scale=crop_scale), flip_seed)
    view = normalize(view)
    return view, view


def check_aug(aug: str) -> None:
    """A clear error for an unknown ``aug`` (raised before any pipeline is built)."""
    if aug not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {aug!r}; known: {', '.join(AUGMENTATIONS)}")


def _resize_uint8(image: tf.Tensor, size, method: str) -> tf.Tensor:
    """Antialiased resize that returns uint8, rounding and clipping as PIL does."""
    resized = tf.image.resize(image, size, method=method, antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def _split(seed, num: int) -> tf.Tensor:
    """int64 [num, 2] seeds from one seed.

    The seed is cast to int64 first: ``stateless_split`` draws different numbers for an int32
    and an int64 seed of the same value, and an op must depend on the seed's value only (a
    Python list becomes int32, a ``tf.data`` counter int64).
    """
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num)
