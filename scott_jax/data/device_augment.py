"""The colour half of the pretraining views, in JAX, inside the jitted step.

With ``config.data.color_on_device`` the input pipeline yields each example's cropped, flipped
view as uint8 (``pretrain_batches(color_on_device=True)``) and ``two_views`` makes the context
and target views from it on the accelerator: per view the reference's colour augmentation
(``color_augment``), then ImageNet normalisation. With ``aug='diff'`` that halves the host's
CPU time per image (``benchmarks/bench_input.py``).

Same ops, probabilities, ranges, random order and 0..255 integer arithmetic as ``augment``'s
TensorFlow ops, but drawn from ``jax.random`` and computed in float32, so a value on a rounding
boundary can land one step off (tests bound how often); docs/design.md#augmentation explains
why neither difference changes the distribution of the views. Every function works on one
image of pixel floats [H, W, 3]; ``two_views`` maps the colours over the batch with
``color_augment_examples``: ``color_augment`` one example at a time on a CPU, the branch-free
``color_augment_vectorised`` (same values) elsewhere. This module imports no TensorFlow.
"""

import functools

import jax
import jax.numpy as jnp

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
    check_aug,
)


def two_views(
    views: jax.Array, key: jax.Array, aug: str, sequential: bool | None = None
) -> tuple[jax.Array, jax.Array]:
    """uint8 (or pixel floats) [B, S, S, 3] -> (context, target), each float32 [B, S, S, 3].

    views: the batch's cropped and flipped views (``pretrain_batches(color_on_device=True)``
    'view'); key: a ``jax.random`` key, e.g. the step's. Example b of the global batch draws
    with ``split(key, 2 B)[b]`` for its context and ``[B + b]`` for its target, so the result
    does not depend on how the batch is sharded. ``aug`` as in ``augment.two_views``: 'none'
    only normalises (both views the same array), 'same' colours once for both, 'diff' and
    'reference' colour each view with its own draw ('diff' has the same context as 'same').
    The examples are mapped with ``map_examples(..., sequential)``.
    """
    check_aug(aug)
    if views.ndim != 4 or views.shape[-1] != 3:
        raise ValueError(f"views must be [B, S, S, 3], got shape {views.shape}")
    x = views.astype(jnp.float32)
    if aug == "none":
        x = normalize(x)
        return x, x
    batch = x.shape[0]
    keys = jax.random.split(key, 2 * batch)
    if aug == "same":
        context = normalize(color_augment_examples(x, keys[:batch], sequential))
        return context, context
    # 'diff' and 'reference': both views in one map (one traced copy of the ops), each
    # example's two next to each other, so that a sharded batch stays sharded as it is.
    pairs = jnp.stack([keys[:batch], keys[batch:]], 1).reshape(-1)
    views = normalize(color_augment_examples(jnp.repeat(x, 2, axis=0), pairs, sequential))
    views = views.reshape(batch, 2, *x.shape[1:])
    return views[:, 0], views[:, 1]


def color_augment_examples(
    x: jax.Array, keys: jax.Array, sequential: bool | None = None
) -> jax.Array:
    """``color_augment`` of each example: pixel floats [n, H, W, 3], keys [n] -> same.

    One example at a time (``map_examples``), each random choice a branch; vectorised, the
    branch-free ``color_augment_vectorised``, which gives the same values.
    """
    if sequential is None:
        sequential = sequential_by_default()
    if sequential:
        return map_examples(lambda example: color_augment(*example), (x, keys), True)
    return jax.vmap(color_augment_vectorised)(x, keys)


def map_examples(fn, examples, sequential: bool | None = None):
    """fn mapped over the leading axis of the pytree ``examples``: one example at a time
    (``lax.map``) if ``sequential``, else vectorised (``vmap``); the same values either way.

    Vectorised, each random choice (``lax.cond`` / ``lax.switch``) becomes a select: every op
    runs on every example and the drawn result is kept, but each op is one pass over the whole
    batch, which suits an accelerator. One at a time, a choice is a branch: only the drawn ops
    run, and matrix products are whole per-image GEMMs. On XLA:CPU that makes the device-cache
    views several times cheaper (docs/performance.md#device-cache); on a GPU a loop of small
    kernels would be slower. None (the default): ``sequential_by_default()``, one at a time on
    a single CPU device and vectorised otherwise (an accelerator, or several devices, where the
    vectorised map keeps the batch sharded; a loop over a sharded batch would run it whole on
    every device).
    """
    if sequential is None:
        sequential = sequential_by_default()
    return jax.lax.map(fn, examples) if sequential else jax.vmap(fn)(examples)


def sequential_by_default() -> bool:
    """Whether ``map_examples`` maps one example at a time by default: on a single CPU device."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def normalize(x: jax.Array) -> jax.Array:
    """[..., 3] in [0, 255] -> float32 (x / 255 - mean) / std, ImageNet statistics."""
    x = x.astype(jnp.float32) / 255.0
    return (x - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)


def color_augment(x: jax.Array, key: jax.Array) -> jax.Array:
    """One view's colour augmentation: pixel floats [H, W, 3] -> same.

    ``augment.color_augment``: with probability 0.6, jitter (p 0.8), grayscale (p 0.1) and blur
    (p 0.3), each drawn on its own, in a uniformly random order; otherwise the image unchanged.
    Each draw has its own key, so an op draws the same numbers wherever the order puts it.
    """
    gate, order, jitter_coin, jitter, gray_coin, blur_coin, blur = jax.random.split(key, 7)
    ops = (
        lambda y: _random_apply(y, jitter_coin, JITTER_P, lambda z: color_jitter(z, jitter)),
        lambda y: _random_apply(y, gray_coin, GRAYSCALE_P, grayscale),
        lambda y: _random_apply(y, blur_coin, BLUR_P, lambda z: gaussian_blur(z, blur)),
    )
    return _random_apply(x, gate, COLOUR_P, lambda y: _in_random_order(y, ops, order))


def color_augment_vectorised(x: jax.Array, key: jax.Array) -> jax.Array:
    """``color_augment(x, key)`` without branches, for ``vmap``: the same draws and values.

    Under ``vmap`` a branch becomes a select over every outcome, which for the random order
    computes every op at every position (3 x (4 x 4 jitter sub-ops + grayscale + blur)).
    Here each op runs once per slot of a fixed sequence that can hold any order, and an
    example keeps an op's result only in the slot its draws put it in (else its input):
    grayscale, blur, grayscale, *jitter*, grayscale, blur, grayscale for the three ops (any
    order of them is a subsequence), and inside the jitter 3 blends, the hue shift, 3 blends
    (brightness, contrast and saturation are all blends, of black, the mean grey and the grey
    image). That is 1 hue shift, 2 blurs and 10 cheap passes instead of 54 ops.
    """
    gate, order, jitter_coin, jitter, gray_coin, blur_coin, blur = jax.random.split(key, 7)
    colour = jax.random.uniform(gate) < COLOUR_P
    do_jitter = colour & (jax.random.uniform(jitter_coin) < JITTER_P)
    do_gray = colour & (jax.random.uniform(gray_coin) < GRAYSCALE_P)
    do_blur = colour & (jax.random.uniform(blur_coin) < BLUR_P)
    # Positions of jitter, grayscale, blur in _in_random_order's order.
    jitter_at, gray_at, blur_at = jnp.argsort(jax.random.permutation(order, 3))
    gray_first, blur_first = gray_at < jitter_at, blur_at < jitter_at
    blur_then_gray = blur_at < gray_at
    sigma = jax.random.uniform(blur, (), minval=BLUR_SIGMA[0], maxval=BLUR_SIGMA[1])

    def gray_if(y, keep):
        return jnp.where(keep, grayscale(y), y)

    def blur_if(y, keep):
        return jnp.where(keep, gaussian_filter(y, sigma), y)

    x = gray_if(x, do_gray & gray_first & ~blur_then_gray)
    x = blur_if(x, do_blur & blur_first)
    x = gray_if(x, do_gray & gray_first & blur_then_gray)
    x = _color_jitter_vectorised(x, jitter, do_jitter)
    x = gray_if(x, do_gray & ~gray_first & (blur_first | ~blur_then_gray))
    x = blur_if(x, do_blur & ~blur_first)
    return gray_if(x, do_gray & ~gray_first & ~blur_first & blur_then_gray)


def color_jitter(
    x: jax.Array,
    key: jax.Array,
    brightness: float = JITTER[0],
    contrast: float = JITTER[1],
    saturation: float = JITTER[2],
    hue: float = JITTER[3],
) -> jax.Array:
    """torchvision ``ColorJitter`` on pixel floats [H, W, 3] (``augment.color_jitter``).

    Factors ~ U[max(0, 1 - s), 1 + s] for brightness, contrast and saturation, a hue shift
    ~ U[-hue, hue] turns; the sub-ops in a uniformly random order, a strength of 0 left out.
    """
    factor_key, order_key = jax.random.split(key)
    u = jax.random.uniform(factor_key, (4,))

    def factor(k: int, strength: float) -> jax.Array:
        lo = max(0.0, 1.0 - strength)
        return lo + (1.0 + strength - lo) * u[k]

    ops = []
    if brightness:
        ops.append(functools.partial(adjust_brightness, factor=factor(0, brightness)))
    if contrast:
        ops.append(functools.partial(adjust_contrast, factor=factor(1, contrast)))
    if saturation:
        ops.append(functools.partial(adjust_saturation, factor=factor(2, saturation)))
    if hue:
        ops.append(functools.partial(adjust_hue, shift=hue * (2.0 * u[3] - 1.0)))
    return _in_random_order(x, ops, order_key)


def _color_jitter_vectorised(x: jax.Array, key: jax.Array, apply) -> jax.Array:
    """``color_jitter(x, key)`` where ``apply``, else x, without branches (``JITTER``'s
    strengths, all four non-zero): blend, blend, blend, hue shift, blend, blend, blend, each
    blend slot taking the sub-op that the drawn order puts there (or keeping its input)."""
    if not all(JITTER):  # color_jitter leaves a zero strength out of its order
        raise ValueError(f"the vectorised jitter needs four non-zero strengths, got {JITTER}")
    factor_key, order_key = jax.random.split(key)
    u = jax.random.uniform(factor_key, (4,))
    # color_jitter's factors: brightness, contrast, saturation (blend kinds 0, 1, 2), hue.
    lows = [max(0.0, 1.0 - s) for s in JITTER[:3]]
    spans = [1.0 + s - lo for s, lo in zip(JITTER[:3], lows, strict=True)]
    factors = jnp.array(lows) + jnp.array(spans) * u[:3]
    shift = JITTER[3] * (2.0 * u[3] - 1.0)
    order = jax.random.permutation(order_key, 4)  # order[position]: sub-op (3 = hue)
    hue_at = jnp.argmax(order == 3)
    for slot in range(6):  # 3 before the hue shift, 3 after
        position = slot if slot < 3 else hue_at + slot - 2
        kind = order[jnp.minimum(position, 3)]
        keep = apply & (position < hue_at if slot < 3 else position < 4)
        x = jnp.where(keep, _blend_kind(x, kind, factors[jnp.minimum(kind, 2)]), x)
        if slot == 2:
            x = jnp.where(apply, adjust_hue(x, shift), x)
    return x


def _blend_kind(x: jax.Array, kind, factor) -> jax.Array:
    """``adjust_brightness`` (kind 0), ``adjust_contrast`` (1) or ``adjust_saturation`` (2),
    by a traced kind: the same blend of x with black, the mean luma or the luma image."""
    luma = _luma(x)
    count = luma.size
    mean = (2 * jnp.sum(luma.astype(jnp.int32)) + count) // (2 * count)
    degenerate = jnp.where(kind == 0, 0.0, jnp.where(kind == 1, mean.astype(jnp.float32), luma))
    return _blend(degenerate, x, factor)


def adjust_brightness(x: jax.Array, factor) -> jax.Array:
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    return _blend(0.0, x, factor)


def adjust_contrast(x: jax.Array, factor) -> jax.Array:
    """PIL ``ImageEnhance.Contrast``: blend with the mean of the luma image, rounded half up.

    The mean is formed in int32 ((2 sum + n) // 2n), exact for images up to 8.4 Mpixel.
    """
    luma = _luma(x).astype(jnp.int32)
    count = luma.size
    mean = (2 * jnp.sum(luma) + count) // (2 * count)
    return _blend(mean.astype(jnp.float32), x, factor)


def adjust_saturation(x: jax.Array, factor) -> jax.Array:
    """PIL ``ImageEnhance.Color``: blend with the grayscale image."""
    return _blend(_luma(x), x, factor)


def adjust_hue(x: jax.Array, shift) -> jax.Array:
    """torchvision's PIL ``adjust_hue``: to PIL's uint8 HSV, hue += int(shift * 255) modulo 256
    (hue in 256ths of a turn, the shift truncated towards 0), back to RGB."""
    return _hsv_to_rgb(*_rgb_to_hsv(x), shift)


def grayscale(x: jax.Array) -> jax.Array:
    """PIL ``convert('L')`` in all three channels: pixel floats [H, W, 3] -> [H, W, 3]."""
    return jnp.broadcast_to(_luma(x), x.shape)


def gaussian_blur(
    x: jax.Array,
    key: jax.Array,
    kernel_size: int = BLUR_KERNEL,
    sigma: tuple[float, float] = BLUR_SIGMA,
) -> jax.Array:
    """torchvision ``GaussianBlur`` (``augment.gaussian_blur``) with sigma ~ U(sigma)."""
    return gaussian_filter(x, jax.random.uniform(key, (), minval=sigma[0], maxval=sigma[1]))


def gaussian_filter(x: jax.Array, sigma, kernel_size: int = BLUR_KERNEL) -> jax.Array:
    """Pixel floats [H, W, 3] blurred with standard deviation sigma, rounded half to even.

    The kernel_size-tap kernel exp(-d^2 / (2 sigma^2)) at integer offsets d, normalised, along
    both axes (separable), with reflect padding (the edge pixel not repeated). H and W must
    exceed kernel_size // 2.
    """
    half = kernel_size // 2
    if min(x.shape[0], x.shape[1]) <= half:
        raise ValueError(f"the blur needs images larger than {half} px, got {x.shape[:2]}")
    offsets = jnp.arange(kernel_size, dtype=jnp.float32) - half
    pdf = jnp.exp(-0.5 * jnp.square(offsets / sigma))
    kernel = pdf / jnp.sum(pdf)
    padded = jnp.pad(x, ((half, half), (half, half), (0, 0)), mode="reflect")
    height, width = x.shape[0], x.shape[1]
    rows = sum(kernel[k] * padded[k : k + height] for k in range(kernel_size))
    out = sum(kernel[k] * rows[:, k : k + width] for k in range(kernel_size))
    return jnp.round(out)


def _random_apply(x: jax.Array, key: jax.Array, p: float, op) -> jax.Array:
    """op(x) with probability p, else x (torchvision ``RandomApply``)."""
    return jax.lax.cond(jax.random.uniform(key) < p, op, lambda y: y, x)


def _in_random_order(x: jax.Array, ops, key: jax.Array) -> jax.Array:
    """The ops (each x -> same shape) composed in a uniformly random order.

    A loop over the positions, so that the program holds each op once (under ``vmap`` every
    op still runs at every position, and the drawn one is kept: ``color_augment_vectorised``
    is the form for ``vmap``).
    """
    order = jax.random.permutation(key, len(ops))
    return jax.lax.fori_loop(
        0, len(ops), lambda position, y: jax.lax.switch(order[position], ops, y), x
    )


def _blend(degenerate, x: jax.Array, factor) -> jax.Array:
    """PIL ``Image.blend(degenerate, x, factor)``: degenerate + factor (x - degenerate),
    clipped to [0, 255] and truncated, as PIL stores it in uint8."""
    return jnp.floor(jnp.clip(degenerate + factor * (x - degenerate), 0.0, 255.0))


def _luma(x: jax.Array) -> jax.Array:
    """PIL's RGB -> L, (299 R + 587 G + 114 B) / 1000 rounded, in its 16-bit fixed point:
    pixel floats [..., 3] -> [..., 1], exact in int32."""
    q = x.astype(jnp.int32)
    weighted = sum(q[..., c : c + 1] * LUMA_WEIGHTS[c] for c in range(3))
    return ((weighted + 32768) >> 16).astype(jnp.float32)


def _rgb_to_hsv(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PIL's RGB -> HSV (``rgb2hsv_row``): pixel floats [H, W, 3] -> (h, s, v), each [H, W],
    uint8 values (h in 256ths of a turn), each channel difference divided by the span and the
    hue and saturation truncated as in PIL's C code (float32 where it mixes in doubles)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    span = maxc - jnp.minimum(jnp.minimum(r, g), b)
    gray = span == 0
    safe_span = jnp.where(gray, 1.0, span)
    # PIL: red max -> bc - gc; else green max -> 2 + rc - bc; else 4 + gc - rc, where
    # xc = (maxc - x) / span.
    r_max = r == maxc
    g_max = ~r_max & (g == maxc)
    first = jnp.where(r_max, maxc - b, jnp.where(g_max, maxc - r, maxc - g)) / safe_span
    second = jnp.where(r_max, maxc - g, jnp.where(g_max, maxc - b, maxc - r)) / safe_span
    offset = jnp.where(r_max, 0.0, jnp.where(g_max, 2.0, 4.0))
    # PIL sums in double and rounds once to float: an error-free sum, rounded at the end.
    difference, error = _two_sum(first, -second)
    total, error_total = _two_sum(offset, difference)
    turns = (total + (error + error_total)) / 6.0  # In (-1/6, 1); PIL: fmod(turns + 1, 1).
    turns = jnp.where(turns < 0, turns + 1.0, turns)  # + 1 only where it changes the value.
    hue = jnp.where(gray, 0.0, jnp.floor(turns * 255.0))
    saturation = jnp.where(gray, 0.0, jnp.floor(span / jnp.where(gray, 1.0, maxc) * 255.0))
    return hue, saturation, maxc


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum)."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def _hsv_to_rgb(hue: jax.Array, saturation: jax.Array, value: jax.Array, shift) -> jax.Array:
    """Hue shift by trunc(shift * 255) steps modulo 256, then PIL's HSV -> RGB (``hsv2rgb``):
    uint8 values (h, s, v), each [H, W] -> pixel floats [H, W, 3].

    Sector i and fraction f of h * 6 / 255 (formed from integers: exact i, f rounded once);
    each channel is round(v (1 - w s / 255)) with its weight w in {0, 1, f, 1 - f} by sector,
    which is PIL's v, p, q or t.
    """
    hue = jnp.mod(hue + jnp.trunc(shift * 255.0), 256.0)
    sixths = hue * 6.0
    k = jnp.floor(sixths / 255.0)  # 0..5, or 6 for h = 255 (C's i % 6 makes it sector 0).
    f = (sixths - k * 255.0) / 255.0
    # Sector k: (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q), and k = 6 as k = 0;
    # v, p, q, t have weights 0, 1, f, 1 - f.
    weight_r = jnp.where(
        k == 1, f, jnp.where((k == 2) | (k == 3), 1.0, jnp.where(k == 4, 1.0 - f, 0.0))
    )
    weight_g = jnp.where(
        (k == 0) | (k == 6),
        1.0 - f,
        jnp.where(k == 3, f, jnp.where((k == 4) | (k == 5), 1.0, 0.0)),
    )
    weight_b = jnp.where(
        k == 2, 1.0 - f, jnp.where(k == 5, f, jnp.where((k == 3) | (k == 4), 0.0, 1.0))
    )
    weight = jnp.stack([weight_r, weight_g, weight_b], -1)
    scale = 1.0 - weight * saturation[..., None] * (1.0 / 255.0)
    return jnp.floor(value[..., None] * scale + 0.5)
