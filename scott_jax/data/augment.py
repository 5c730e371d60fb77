"""Image transforms of the reference (`src/data/transforms.py`) as TensorFlow ops.

Every op works on one image [H, W, 3], eagerly or inside ``tf.data`` (tests check both), and
takes all sizes as arguments. Randomness comes only from the ``seed`` argument (an int [2]
tensor) through TensorFlow's *stateless* random ops, so an augmentation is a pure function of
(image, seed); the pipeline seeds each example by its position in the stream, which is what
lets a resumed run redraw the uninterrupted run's augmentations.

The reference runs torchvision on PIL images, which are uint8 between ops; each op here also
ends on the 0..255 integer grid, rounding or truncating as PIL does (tests compare with PIL
byte for byte, the blur within float rounding). Public ops take and return uint8; inside the
colour augmentation pixels are float32 holding those integers ("pixel floats"), and only
``normalize`` leaves the grid. The pixel math is compiled with XLA (``_xla``). Details:
docs/design.md#augmentation.
"""

import functools
import math
import os

import tensorflow as tf

from scott_jax.data.augment_spec import (
    BLUR_KERNEL,
    BLUR_P,
    BLUR_SIGMA,
    COLOUR_P,
    GRAYSCALE_P,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    JITTER_P,
    LUMA_WEIGHTS,
    MOCA_BLUR_KERNEL,
    MOCA_BLUR_P,
    MOCA_GRAYSCALE_P,
    MOCA_JITTER_P,
    MOCA_SOLARIZE_P,
    check_aug,
)

# TensorFlow is only the input pipeline: keep it off any GPU so that JAX owns the device memory.
if tf.config.get_visible_devices("GPU"):
    tf.config.set_visible_devices([], "GPU")

#: torchvision's RandomResizedCrop tries this many (area, ratio) draws before its fallback.
_CROP_ATTEMPTS = 10


def _xla(fn):
    """``fn`` compiled with XLA (for the CPU, like all of TensorFlow here): the pixel math.

    Plain TensorFlow runs one kernel, and one pass over the image, per elementwise op; XLA fuses
    a function's ops into one loop, 2-5x faster for these functions, which is what keeps two
    colour-augmented views near the cost of the crop (``two_views``). The randomness and the
    control flow stay plain TF (XLA cannot compile the stateless shuffle). XLA:CPU fuses a * b + c
    into an FMA whenever the CPU has one: the colour formulas are written so that this cannot
    change a byte (tests compare them with PIL, and the HSV ones were checked on all 2^24 inputs
    with and without FMA); in the blur it only moves float sums by rounding, like the order of
    the sum. XLA compiles once per image size and pipeline (shapes are generalised after the
    first retrace); a call costs ~0.2 ms. TensorFlow's XLA reads ``XLA_FLAGS`` too, and aborts
    on a flag its version does not know: ``SCOTT_JAX_TF_XLA=0`` runs the same ops uncompiled
    (same values up to FMA rounding in the blur, about 1.5x slower with colour augmentation).
    """
    jit_compile = os.environ.get("SCOTT_JAX_TF_XLA", "1") != "0"
    return tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)


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

    The reference's RandomResizedCrop (`TransformsPipeline`). Antialiased like PIL, which the
    reference resizes with.
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    top, left, crop_h, crop_w = tf.unstack(crop_box(shape[0], shape[1], seed, scale, ratio))
    window = image[top : top + crop_h, left : left + crop_w]  # Keeps the static channel count.
    return resize_window(window, size)


def crop_window(image: tf.Tensor, seed, scale: tuple[float, float] = (0.2, 1.0)) -> tf.Tensor:
    """uint8 [H, W, 3] -> its ``crop_box`` window for ``seed``, uint8 [h, w, 3]."""
    shape = tf.shape(image)
    top, left, height, width = tf.unstack(crop_box(shape[0], shape[1], seed, scale))
    return image[top : top + height, left : left + width]


def random_flip(image: tf.Tensor, seed) -> tf.Tensor:
    """Horizontal flip with probability 0.5 (`TransformsPipeline`); [H, W, C] -> same shape."""
    return tf.image.stateless_random_flip_left_right(image, tf.cast(seed, tf.int64))


@_xla
def normalize(image: tf.Tensor) -> tf.Tensor:
    """[..., 3] in [0, 255] (uint8 or pixel floats) -> float32 (x / 255 - mean) / std.

    ImageNet statistics, as the reference's `T.Normalize`.
    """
    x = tf.cast(image, tf.float32) / 255.0
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def eval_transform(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the test transform (`get_test_transforms`).

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


def color_jitter(
    image: tf.Tensor,
    seed,
    brightness: float = JITTER[0],
    contrast: float = JITTER[1],
    saturation: float = JITTER[2],
    hue: float = JITTER[3],
) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]: torchvision ``ColorJitter`` on a PIL image.

    One of the reference's colour ops (`TransformsPipeline`). Factors:
    brightness ~ U[1 - b, 1 + b], contrast ~ U[1 - c, 1 + c], saturation ~ U[1 - s, 1 + s]
    (lower ends clamped at 0) and a hue shift ~ U[-hue, hue] turns; the four sub-ops run in a
    uniformly random order, and a strength of 0 leaves its sub-op out, as in torchvision.
    Each sub-op is the PIL one torchvision calls: ``_blend`` with black (brightness), with the
    grayscale image's mean (contrast: one scalar for all channels, the rounded mean of the
    luma, not ``tf.image.adjust_contrast``'s per-channel means), with the grayscale image
    (saturation); the hue shift goes through PIL's uint8 HSV (``_shift_hue``).
    """
    jitter = functools.partial(
        _jitter, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue
    )
    return _to_uint8(jitter(_pixels(image), seed))


def random_grayscale(image: tf.Tensor, seed, p: float = GRAYSCALE_P) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]: with probability p, PIL's luma in all 3 channels.

    One of the reference's colour ops: torchvision ``RandomGrayscale``, which on a PIL image
    is ``convert('L')`` stacked three times: L = (299 R + 587 G + 114 B) / 1000, rounded.
    """
    return _to_uint8(_random_apply(_pixels(image), seed, p, _grayscale))


def gaussian_blur(
    image: tf.Tensor,
    seed,
    kernel_size: int = BLUR_KERNEL,
    sigma: tuple[float, float] = BLUR_SIGMA,
) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]: torchvision ``GaussianBlur``.

    One of the reference's colour ops (9 taps there). sigma ~ U(sigma); the kernel_size-tap
    kernel is exp(-x^2 / (2 sigma^2)) at the integer offsets x, normalised to sum 1, applied
    along both axes, with reflect padding (the edge pixel is not repeated) and the result
    rounded half to even. torchvision convolves with the 2-D outer product in one pass; the
    separable form is the same sum in another order, so a pixel whose float value lies within
    ~1e-5 of a half-integer may round the other way (tests allow that). Images must be larger
    than kernel_size // 2 in both dimensions.
    """
    return _to_uint8(_blur(_pixels(image), seed, kernel_size, sigma))


def color_augment(image: tf.Tensor, seed) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]: one view's colour augmentation.

    The reference's per-view colour step (`TransformsPipeline.__call__`). With probability 0.6:
    ``RandomApply(color_jitter, p=0.8)``, ``random_grayscale(p=0.1)`` and
    ``RandomApply(gaussian_blur, p=0.3)``, with the reference's parameters, in a uniformly
    random order of the three; otherwise the image unchanged. Per view that is jitter with
    probability 0.48, grayscale 0.06, blur 0.18, and no op at all 0.4 + 0.6 * 0.2 * 0.9 * 0.7.
    """
    return _to_uint8(_color_augment(_pixels(image), tf.cast(seed, tf.int64)))


def two_views(
    image: tf.Tensor,
    seed,
    *,
    size: int,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    aug: str = "none",
) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 [H, W, 3] -> (context, target), each float32 [size, size, 3], normalised.

    The reference's ``TransformsPipeline`` with two views: one RandomResizedCrop + flip, shared
    by both views so they are spatially identical; then each view's colour augmentation
    (``color_augment``); then ImageNet normalisation. views[0] is the context (masked) view,
    views[1] the target view. ``aug`` (docs/design.md#augmentation):
      'none':      no colour ops; the two views are the same image.
      'same':      one colour draw applied to both views: identical views, with colour (the
                   paper's 'same', which the reference code does not implement).
      'diff':      an independent colour draw per view (the paper's 'different').
      'reference': what the reference code does for both 'same' and 'diff': independent
                   draws per view. An alias of 'diff' (same views for the same seed), kept as
                   its own value so that a config can say it reproduces the code.
      'moca':      MOCA's views, a crop each (``moca_views``).
    """
    check_aug(aug)
    if aug == "moca":
        image = tf.convert_to_tensor(image)
        return moca_views(lambda s: crop_window(image, s, crop_scale), seed, size)
    crop_seed, flip_seed, context_seed, target_seed = view_seeds(seed)
    view = random_flip(random_resized_crop(image, crop_seed, size, scale=crop_scale), flip_seed)
    return color_views(view, context_seed, target_seed, aug)


def view_seeds(seed) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The int64 [2] seeds (crop, flip, context colour, target colour) of one example's views.

    ``two_views`` draws with them; the pipeline uses them directly when it decodes only the
    crop window of a JPEG, so both routes draw the same crop, flip and colours.
    """
    crop_seed, flip_seed, context_seed, target_seed = tf.unstack(_split(seed, 4))
    return crop_seed, flip_seed, context_seed, target_seed


def resize_window(window: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [h, w, 3] crop window -> uint8 [size, size, 3], bicubic, antialiased like PIL.

    The resize half of ``random_resized_crop``, for a window decoded on its own.
    """
    return _resize_uint8(window, (size, size), "bicubic")


def color_views(
    view: tf.Tensor, context_seed, target_seed, aug: str
) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 [S, S, 3] cropped, flipped view -> (context, target), float32, normalised.

    The colour half of ``two_views`` (see there for ``aug``).
    """
    if aug == "none":
        view = normalize(view)
        return view, view
    context = _color_augment(_pixels(view), context_seed)
    if aug == "same":
        context = normalize(context)
        return context, context
    target = _color_augment(_pixels(view), target_seed)  # 'diff' and 'reference'.
    return normalize(context), normalize(target)


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


def _pixels(image: tf.Tensor) -> tf.Tensor:
    """An image as pixel floats: float32 holding its uint8 values."""
    return tf.cast(image, tf.float32)


def _to_uint8(pixels: tf.Tensor) -> tf.Tensor:
    """Pixel floats (already integers in [0, 255]) -> uint8."""
    return tf.cast(pixels, tf.uint8)


def _random_apply(x: tf.Tensor, seed, p: float, op) -> tf.Tensor:
    """op(x) with probability p, else x; op is only run when drawn (torchvision RandomApply)."""
    return tf.cond(tf.random.stateless_uniform([], seed) < p, lambda: op(x), lambda: x)


def _in_random_order(x: tf.Tensor, ops, seed) -> tf.Tensor:
    """The ops (each x -> same shape) composed in a uniformly random order.

    A stateless shuffle of the op indices, then one ``switch_case`` per position: only the
    chosen op runs at each position (and any ``tf.cond`` inside it still skips its work).
    """
    order = tf.random.experimental.stateless_shuffle(tf.range(len(ops)), seed)
    for position in range(len(ops)):
        x = tf.switch_case(order[position], [functools.partial(op, x) for op in ops])
    return x


@tf.function(reduce_retracing=True)
def _color_augment(x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """``color_augment`` on pixel floats [H, W, 3] with an int64 [2] seed tensor.

    Each draw has its own seed, so an op draws the same numbers wherever the order puts it.
    A ``tf.function``: its graph (every op at every position of the order) is traced once per
    process, not once per pipeline or per view.
    """
    gate, order, jitter_coin, jitter, gray_coin, blur_coin, blur = tf.unstack(_split(seed, 7))
    ops = [
        lambda y: _random_apply(y, jitter_coin, JITTER_P, lambda z: _jitter(z, jitter)),
        lambda y: _random_apply(y, gray_coin, GRAYSCALE_P, _grayscale),
        lambda y: _random_apply(y, blur_coin, BLUR_P, lambda z: _blur(z, blur)),
    ]
    return _random_apply(x, gate, COLOUR_P, lambda y: _in_random_order(y, ops, order))


def _jitter(
    x: tf.Tensor,
    seed,
    brightness: float = JITTER[0],
    contrast: float = JITTER[1],
    saturation: float = JITTER[2],
    hue: float = JITTER[3],
) -> tf.Tensor:
    """``color_jitter`` on pixel floats [H, W, 3]."""
    factor_seed, order_seed = tf.unstack(_split(seed, 2))
    u = tf.unstack(tf.random.stateless_uniform([4], factor_seed))

    # float32 draws (as torch's), passed to the XLA calls as float64: see ``_blend``.
    def factor(k, strength):
        lo = max(0.0, 1.0 - strength)
        return tf.cast(lo + (1.0 + strength - lo) * u[k], tf.float64)

    ops = []
    if brightness:
        ops.append(functools.partial(_brightness, factor=factor(0, brightness)))
    if contrast:
        ops.append(functools.partial(_contrast, factor=factor(1, contrast)))
    if saturation:
        ops.append(functools.partial(_saturation, factor=factor(2, saturation)))
    if hue:
        shift = tf.cast(hue * (2.0 * u[3] - 1.0), tf.float64)
        ops.append(functools.partial(_shift_hue, shift=shift))
    return _in_random_order(x, ops, order_seed)


def _blend(degenerate, x: tf.Tensor, factor) -> tf.Tensor:
    """PIL ``Image.blend(degenerate, x, factor)`` on pixel floats, the core of ``ImageEnhance``.

    PIL computes degenerate + factor * (x - degenerate) in float32, rounding the product and
    then the sum, and truncates to uint8, clipping to [0, 255] first (needed when factor > 1
    extrapolates). ``factor`` is a float64 scalar holding a float32 value, from outside the XLA
    call: the product is then formed exactly in float64 and rounded to float32 explicitly. With
    a float32 factor, LLVM narrows that to a float32 product and XLA fuses it with the sum into
    one FMA (always, on CPUs that have FMA), which rounds once and moves some pixels by a level.
    """
    product = tf.cast(factor * tf.cast(x - degenerate, tf.float64), tf.float32)
    return tf.floor(tf.clip_by_value(degenerate + product, 0.0, 255.0))


@_xla
def _brightness(x: tf.Tensor, factor) -> tf.Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    return _blend(0.0, x, factor)


@_xla
def _contrast(x: tf.Tensor, factor) -> tf.Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with the luma image's mean, rounded to an integer."""
    luma = _luma(x)
    total = tf.reduce_sum(tf.cast(luma, tf.float64))  # Integers below 2^53: exact.
    mean = tf.floor(total / tf.cast(tf.size(luma), tf.float64) + 0.5)
    return _blend(tf.cast(mean, tf.float32), x, factor)


@_xla
def _saturation(x: tf.Tensor, factor) -> tf.Tensor:
    """PIL ``ImageEnhance.Color``: blend with the grayscale image."""
    return _blend(_luma(x), x, factor)


@_xla
def _grayscale(x: tf.Tensor) -> tf.Tensor:
    """PIL ``convert('L')`` in 3 channels: pixel floats [H, W, 3] -> [H, W, 3]."""
    return tf.tile(_luma(x), [1, 1, 3])


def _luma(x: tf.Tensor) -> tf.Tensor:
    """PIL's RGB -> L: pixel floats [..., 3] -> [..., 1], (L24 + 2^15) >> 16.

    Exact in float32: every product and sum is an integer below 2^24.
    """
    r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    weighted = r * LUMA_WEIGHTS[0] + g * LUMA_WEIGHTS[1] + b * LUMA_WEIGHTS[2]
    return tf.floor((weighted + 32768.0) / 65536.0)


def _shift_hue(x: tf.Tensor, shift) -> tf.Tensor:
    """torchvision's PIL ``adjust_hue``: pixel floats [H, W, 3] -> [H, W, 3].

    The image goes to PIL's uint8 HSV (hue in 256ths of a turn), its hue channel is shifted
    by int(shift * 255) (truncated towards 0) with uint8 wrap-around, and it comes back to RGB.
    The uint8 HSV round trip loses precision even at shift 0, as in the reference. ``shift``
    is a float64 scalar (a float32 draw, as torch's). Two XLA calls: compiled as one, XLA
    recomputes the RGB -> HSV step for each output channel.
    """
    return _hsv_to_rgb(*_rgb_to_hsv(x), shift)


@_xla
def _rgb_to_hsv(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """PIL's RGB -> HSV (``rgb2hsv_row``): pixel floats [H, W, 3] -> (h, s, v), each [H, W].

    h, s, v are uint8 values (h in 256ths of a turn). PIL's C code mixes float32 and double
    arithmetic and truncates. The hue follows it step for step, dividing only the two channel
    differences it uses (its offset + a - b is exact in float64, so one rounding to float32
    equals C's float or double sum); the saturation's product with 255 is float32 instead of
    double. All 2^24 colours give PIL's bytes, with or without FMA contraction (checked
    exhaustively in development; tests check a sample).
    """
    f32, f64 = tf.float32, tf.float64
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = tf.maximum(tf.maximum(r, g), b)
    span = maxc - tf.minimum(tf.minimum(r, g), b)
    gray = span == 0
    safe_span = tf.where(gray, 1.0, span)
    # PIL: red max -> bc - gc; else green max -> 2 + rc - bc; else 4 + gc - rc, where
    # xc = (maxc - x) / span in float32.
    r_max = r == maxc
    g_max = tf.logical_and(tf.logical_not(r_max), g == maxc)
    first = tf.where(r_max, maxc - b, tf.where(g_max, maxc - r, maxc - g)) / safe_span
    second = tf.where(r_max, maxc - g, tf.where(g_max, maxc - b, maxc - r)) / safe_span
    offset = tf.where(r_max, 0.0, tf.where(g_max, 2.0, 4.0))
    hue = tf.cast(offset, f64) + tf.cast(first, f64) - tf.cast(second, f64)
    turns = tf.cast(tf.cast(hue, f32), f64) / 6.0 + 1.0  # In (5/6, 2): fmod = frac.
    turns = tf.cast(turns - tf.floor(turns), f32)
    hue = tf.where(gray, 0.0, tf.cast(tf.floor(tf.cast(turns, f64) * 255.0), f32))
    saturation = tf.where(gray, 0.0, tf.floor(span / tf.where(gray, 1.0, maxc) * 255.0))
    return hue, saturation, maxc


@_xla
def _hsv_to_rgb(hue: tf.Tensor, saturation: tf.Tensor, value: tf.Tensor, shift) -> tf.Tensor:
    """Hue shift, then PIL's HSV -> RGB (``hsv2rgb``): uint8 values (h, s, v), each [H, W]
    -> pixel floats [H, W, 3].

    The hue moves by int(shift * 255) steps (truncated towards 0, as torchvision's
    ``np.int8(shift * 255)``) modulo 256. PIL then takes the sector i and fraction f of
    h * 6 / 255 (double, f stored as float32) and sets each channel to v, p, q or t by sector,
    p = round(v (1 - s / 255)), q = round(v (1 - f s / 255)), t = round(v (1 - (1 - f) s / 255))
    (C's round, half away from zero). Here every channel is round(v (1 - w s / 255)) with its
    weight w in {0, 1, f, 1 - f} picked by sector, in float32 with a multiplication by 1/255:
    the same bytes as PIL for all 2^24 (h, s, v), with or without FMA contraction (checked
    exhaustively in development, compiled and as plain TF ops; tests check a sample).
    """
    steps = tf.cast(shift * 255.0, tf.int32)  # float64, truncated towards 0.
    hue = tf.math.floormod(hue + tf.cast(steps, tf.float32), 256.0)
    sixths = tf.cast(hue, tf.float64) * (6.0 / 255.0)
    sector = tf.floor(sixths)
    f = tf.cast(sixths - sector, tf.float32)
    k = tf.cast(sector, tf.float32)  # 0..5, or 6 for h = 255 (C's i % 6 makes it sector 0).
    # Sector k: (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q), and k = 6 as k = 0;
    # v, p, q, t have weights 0, 1, f, 1 - f.
    weight_r = tf.where(
        k == 1, f, tf.where((k == 2) | (k == 3), 1.0, tf.where(k == 4, 1.0 - f, 0.0))
    )
    weight_g = tf.where(
        (k == 0) | (k == 6), 1.0 - f, tf.where(k == 3, f, tf.where((k == 4) | (k == 5), 1.0, 0.0))
    )
    weight_b = tf.where(
        k == 2, 1.0 - f, tf.where(k == 5, f, tf.where((k == 3) | (k == 4), 0.0, 1.0))
    )
    weight = tf.stack([weight_r, weight_g, weight_b], -1)
    return tf.floor(value[..., None] * (1.0 - weight * saturation[..., None] * (1.0 / 255.0)) + 0.5)


def _gaussian_kernel(kernel_size: int, sigma) -> tf.Tensor:
    """torchvision's 1-D Gaussian kernel, float32 [kernel_size], summing to 1."""
    offsets = tf.range(kernel_size, dtype=tf.float32) - (kernel_size - 1) / 2
    pdf = tf.exp(-0.5 * tf.square(offsets / sigma))
    return pdf / tf.reduce_sum(pdf)


def _blur(
    x: tf.Tensor, seed, kernel_size: int = BLUR_KERNEL, sigma: tuple[float, float] = BLUR_SIGMA
) -> tf.Tensor:
    """``gaussian_blur`` on pixel floats [H, W, 3]."""
    return _gaussian_filter(x, tf.random.stateless_uniform([], seed, *sigma), kernel_size)


def _gaussian_filter(x: tf.Tensor, sigma, kernel_size: int) -> tf.Tensor:
    """Pixel floats [H, W, 3] blurred with standard deviation sigma, reflect-padded, rounded.

    The two 1-D passes are separate XLA calls: compiled together, XLA fuses the first pass into
    every tap of the second and computes it kernel_size times over.
    """
    kernel = _gaussian_kernel(kernel_size, sigma)
    half = kernel_size // 2
    shape = tf.shape(x)
    padded = tf.pad(x, [[half, half], [half, half], [0, 0]], mode="REFLECT")
    # [H + 2 half, (W + 2 half) * 3]: a column shift is a shift by 3 along the flat rows.
    padded = tf.reshape(padded, [shape[0] + 2 * half, -1])
    rows = _correlate(padded, kernel, axis=0, step=1, taps=kernel_size)  # [H, (W + 2 half) * 3]
    out = _correlate(rows, kernel, axis=1, step=3, taps=kernel_size)  # [H, W * 3]
    return tf.round(tf.reshape(out, shape))


@_xla
def _correlate(x: tf.Tensor, kernel: tf.Tensor, axis: int, step: int, taps: int) -> tf.Tensor:
    """sum_k kernel[k] * x[.. k * step + i ..] along ``axis`` of a 2-D x, valid outputs only.

    x [M, N] -> [M - (K - 1) * step, N] (axis 0) or [M, N - (K - 1) * step] (axis 1), K = taps
    (a Python int: the traced kernel's length is generalised away when two sizes are used).
    """
    length = tf.shape(x)[axis] - (taps - 1) * step
    out = 0.0
    for k in range(taps):
        begin, size = [0, 0], [-1, -1]
        begin[axis], size[axis] = k * step, length
        out += kernel[k] * tf.slice(x, begin, size)
    return out


# ---------------------------------------------------------------------------
# MOCA's two views (valeoai/MOCA `util/transforms.py`, `DataAugmentationTwoViews`)


def moca_views(window_at, seed, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """MOCA's two views of one image: float32 [size, size, 3] each, normalised.

    ``window_at(crop_seed)`` -> a uint8 RandomResizedCrop window (``crop_box``; the pipeline
    decodes only it). Each view has its own crop (BYOL / MoCo-v3, unlike the shared crop of the
    other modes), resized bilinearly as torchvision's default, then ``moca_colour`` and a flip.
    """
    views = []
    for view, view_seed in enumerate(tf.unstack(_split(seed, 2))):
        crop_seed, colour_seed, flip_seed = tf.unstack(_split(view_seed, 3))
        x = _resize_uint8(window_at(crop_seed), (size, size), "bilinear")
        x = random_flip(moca_colour(x, colour_seed, view), flip_seed)
        views.append(normalize(x))
    return views[0], views[1]


def moca_colour(image: tf.Tensor, seed, view: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8: view `view` (0 or 1) of MOCA's colour recipe, in its fixed
    order: jitter (p 0.8), grayscale (p 0.2), Gaussian blur with sigma ~ U(0.1, 2) (p 1.0 for
    view 0, 0.1 for view 1), solarize (p 0 / 0.2).

    PIL's ``GaussianBlur(radius)`` (sigma = radius, an extended-box approximation without
    cut-off) is replaced by the exact Gaussian on 13 taps (±3 sigma at the largest sigma),
    reflect-padded as the other blur.
    """
    jitter_coin, jitter, gray_coin, blur_coin, blur, solarize_coin = tf.unstack(
        _split(tf.cast(seed, tf.int64), 6)
    )
    x = _pixels(image)
    x = _random_apply(x, jitter_coin, MOCA_JITTER_P[view], lambda z: _jitter(z, jitter))
    x = _random_apply(x, gray_coin, MOCA_GRAYSCALE_P[view], _grayscale)
    x = _random_apply(
        x, blur_coin, MOCA_BLUR_P[view], lambda z: _blur(z, blur, MOCA_BLUR_KERNEL, BLUR_SIGMA)
    )
    if MOCA_SOLARIZE_P[view]:
        x = _random_apply(x, solarize_coin, MOCA_SOLARIZE_P[view], _solarize)
    return _to_uint8(x)


def solarize(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8: PIL's ``ImageOps.solarize`` (threshold 128)."""
    return _to_uint8(_solarize(_pixels(image)))


def _solarize(x: tf.Tensor) -> tf.Tensor:
    return tf.where(x >= 128.0, 255.0 - x, x)
