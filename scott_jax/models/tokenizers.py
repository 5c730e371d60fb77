"""Tokenizers: images [B, H, W, 3] -> tokens [B, N, D], N = (H/p)·(W/p) in row-major order.

`ScottTokenizer` is the Sparse Convolutional Tokenizer (official `src/models/scott.py`,
`SparseCNNTokenizer`): a two-layer conv stem whose "sparse" behaviour is emulated by masking,
SparK-style (`src/models/sparsify.py`). `PatchEmbedTokenizer` is the plain ViT patch
embedding of the "No SCOTT" ablation (`src/models/vit.py`, `PatchEmbed`). Both are explained
in docs/design.md#tokenizers.

Both take `keep_mask` [B, N] (1 = visible patch, 0 = masked), so the encoder can treat
them alike; the patch embedding ignores it because its patches do not overlap and the
transformer replaces masked tokens anyway.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from scott_jax.models import initializers
from scott_jax.models.linear import matmul_2d

#: Total downsampling of the SCOTT stem: two stride-2 convs and two stride-2 blur pools.
SCOTT_PATCH_SIZE = 16

#: The tokenizers an encoder can be built with (`make_tokenizer`).
TOKENIZERS = ("scott", "vit")


def patch_grid(img_size: int, patch_size: int) -> int:
    """Side of the square patch grid; a clear error when the image does not tile."""
    if img_size <= 0 or img_size % patch_size:
        lower = max(patch_size, img_size // patch_size * patch_size)
        raise ValueError(
            f"image size {img_size} is not divisible by the patch size {patch_size}: the patch "
            f"grid would be {img_size / patch_size:g} x {img_size / patch_size:g}. Use a multiple "
            f"of {patch_size}, e.g. {lower} or {lower + patch_size}."
        )
    return img_size // patch_size


class PatchGrid:
    """`grid_size` and `num_patches` of an encoder module with `img_size` and `patch_size`
    fields (a mixin of the methods' encoders)."""

    @property
    def grid_size(self) -> int:
        return patch_grid(self.img_size, self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


def check_inputs(images: jax.Array, keep_mask: jax.Array | None, img_size: int, grid: int):
    """Validates static shapes: images [B, img_size, img_size, 3], keep_mask [B, grid²]."""
    if images.ndim != 4 or images.shape[1:3] != (img_size, img_size):
        raise ValueError(
            f"expected images of shape [B, {img_size}, {img_size}, C] (NHWC) for a model built "
            f"with img_size={img_size}, got {tuple(images.shape)}"
        )
    if keep_mask is not None and keep_mask.shape != (images.shape[0], grid * grid):
        raise ValueError(
            f"keep_mask must have shape [B, N] = [{images.shape[0]}, {grid * grid}] for a "
            f"{grid}x{grid} patch grid, got {tuple(keep_mask.shape)}"
        )


def upsample_mask(active: jax.Array, size: int) -> jax.Array:
    """Nearest-repeat a [B, g, g] patch map to [B, size, size, 1] (size a multiple of g).

    Feature-map pixel (i, j) at resolution `size` belongs to patch (i·g/size, j·g/size),
    as in the reference's `repeat_interleave` (`src/models/sparsify.py`).
    """
    factor = size // active.shape[1]
    up = jnp.repeat(jnp.repeat(active, factor, axis=1), factor, axis=2)
    return up[..., None]


def _binomial_stride2(x: jax.Array, axis: int) -> jax.Array:
    """[1, 2, 1]/4 filter along `axis` with zero padding 1 and stride 2 (L -> ceil(L/2))."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    x = jnp.pad(x, pad)
    out = (x.shape[axis] - 3) // 2 + 1

    def tap(offset):
        return jax.lax.slice_in_dim(x, offset, offset + 2 * out - 1, stride=2, axis=axis)

    return (tap(0) + 2.0 * tap(1) + tap(2)) * 0.25


def _window_taps(x: jax.Array) -> tuple[jax.Array, ...]:
    """The four taps of 2x2 stride-1 windows of [B, H, W, C], row-major: each [B, H-1, W-1, C]."""
    return tuple(
        x[:, i : x.shape[1] - 1 + i, j : x.shape[2] - 1 + j] for i in (0, 1) for j in (0, 1)
    )


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 1, no padding: [B, H, W, C] -> [B, H-1, W-1, C].

    The gradient goes to the first maximum of each window in row-major order (PyTorch's
    tie rule). Written as four shifted slices rather than `reduce_window` because XLA:CPU
    lowers the latter's gradient to a scatter with int32 index tensors 4x the size of the
    activation: slow, and the largest buffers of the step. Here the backward pass is a
    handful of fused element-wise ops.
    """
    a, b, c, d = _window_taps(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_2x2_fwd(x):
    return max_pool_2x2(x), x


def _max_pool_2x2_bwd(x, grad):
    pooled = max_pool_2x2(x)
    taken = jnp.zeros(pooled.shape, bool)
    dx = jnp.zeros_like(x)
    for (i, j), tap in zip(((0, 0), (0, 1), (1, 0), (1, 1)), _window_taps(x), strict=True):
        first = (tap == pooled) & ~taken
        taken = taken | first
        routed = jnp.where(first, grad, jnp.zeros_like(grad))
        dx = dx + jnp.pad(routed, ((0, 0), (i, 1 - i), (j, 1 - j), (0, 0)))
    return (dx,)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def max_blur_pool(x: jax.Array) -> jax.Array:
    """Anti-aliased pooling (Zhang 2019): [B, H, W, C] -> [B, H/2, W/2, C] for even H, W.

    2x2 max pool with stride 1 (H -> H-1), then the fixed 3x3 Pascal blur
    outer([1,2,1], [1,2,1])/16 with stride 2 and symmetric zero padding 1 (H-1 -> H/2). The
    blur is separable, so it runs as two strided 3-tap sums instead of a depthwise conv:
    the same numbers, and 3-4x faster forward+backward on XLA:CPU, where depthwise convs
    are slow. It is a constant, not a parameter.
    """
    x = max_pool_2x2(x)
    return _binomial_stride2(_binomial_stride2(x, 1), 2)


CONV_IMPLS = ("auto", "xla", "im2col")


def resolve_conv_impl(impl: str) -> str:
    """'auto' -> 'im2col' on CPU, 'xla' (cuDNN / TPU convs) on accelerators."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; expected one of {CONV_IMPLS}")
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


def kept_patches(keep_mask: jax.Array, max_kept: int) -> tuple[jax.Array, jax.Array]:
    """keep_mask [B, N] -> (kept_index [B, max_kept], overflow [B]).

    kept_index lists each row's kept patches in row-major order, padded with N (an index
    past the grid) when a row keeps fewer; overflow flags rows that keep more than
    max_kept, which the sparse stem cannot represent.
    """
    num_patches = keep_mask.shape[1]
    kept_index = jax.vmap(lambda row: jnp.nonzero(row, size=max_kept, fill_value=num_patches)[0])(
        keep_mask
    )
    overflow = jnp.count_nonzero(keep_mask, axis=1) > max_kept
    return kept_index.astype(jnp.int32), overflow


def _im2col_taps(padded: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """The 49 taps of a 7x7/2 conv: padded [..., H, W, C] -> [..., out_h, out_w, 49·C].

    Channel (i·7 + j)·C + c holds padded[..., 2a + i, 2b + j, c], the layout of
    `kernel.reshape(49·C, O)`. The 7 column taps are gathered first ([..., H, out_w, 7·C]),
    then the 7 row taps of that: two 7-way concatenations instead of one 49-way one, which
    XLA:CPU compiles about 2x faster (forward and backward) at the same run time.
    """
    columns = jnp.concatenate(
        [padded[..., :, j : j + 2 * out_w - 1 : 2, :] for j in range(7)], axis=-1
    )
    return jnp.concatenate([columns[..., i : i + 2 * out_h - 1 : 2, :, :] for i in range(7)], -1)


def sparse_conv7x7s2(
    x: jax.Array, kernel: jax.Array, kept_index: jax.Array, grid: int
) -> jax.Array:
    """7x7 stride-2 conv (padding 3) evaluated only at the output pixels of kept patches.

    x [B, H, W, C], kernel [7, 7, C, O], kept_index [B, K] (from `kept_patches`; index
    grid² = padding) -> [B, H/2, W/2, O], equal to `conv(x) * mask` at the output
    resolution: the SCOTT stem's masked-dense conv (`SparseConv2d`) without computing the
    outputs that the re-mask zeroes. Each kept patch owns q x q output pixels (q = H/2/grid),
    whose 7x7 windows span a (2q+5)² region of the padded input; the K regions of each
    image are gathered, convolved as one im2col matmul and scattered into a zero map. At
    the reference's 60 % masking this does 40 % of the conv's FLOPs, forward and backward.
    """
    batch, height, width, channels = x.shape
    q = height // (2 * grid)
    region = 2 * q + 5
    padded = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))

    def crop(image, index):
        row, col = index // grid, index % grid
        start = (2 * q * row, 2 * q * col, 0)
        return jax.lax.dynamic_slice(image, start, (region, region, channels))

    regions = jax.vmap(jax.vmap(crop, (None, 0)))(padded, kept_index)  # [B, K, R, R, C]
    features = kernel.shape[-1]
    out = matmul_2d(_im2col_taps(regions, q, q), kernel.reshape(-1, features))  # [B, K, q, q, O]
    dense = jnp.zeros((batch, grid * grid, q, q, features), out.dtype)
    # Padding slots get distinct out-of-range indices (still dropped), so the scatter can
    # promise unique indices; otherwise JAX's scatter JVP resolves possible duplicates by
    # scattering u32 ids, a 6.4M-element detour at 224 px.
    num_patches = grid * grid
    slots = jnp.arange(kept_index.shape[1], dtype=kept_index.dtype)
    scatter_index = jnp.where(kept_index < num_patches, kept_index, num_patches + slots)
    dense = dense.at[jnp.arange(batch)[:, None], scatter_index].set(
        out, mode="drop", unique_indices=True
    )
    dense = dense.reshape(batch, grid, grid, q, q, features).transpose(0, 1, 3, 2, 4, 5)
    return dense.reshape(batch, height // 2, width // 2, features)


class StemConv(nn.Module):
    """7x7 stride-2 conv, no bias, explicit padding 3: [B, H, W, I] -> [B, H/2, W/2, O].

    `impl='xla'` is `lax.conv`; `'im2col'` gathers the 49 strided taps and does one matmul,
    which XLA:CPU runs about 1.7x faster forward+backward for the 64 -> 384 conv; `'auto'`
    picks im2col on CPU and the XLA conv (cuDNN) on accelerators. Same params and numbers.
    Explicit padding matters: 'SAME' would pad (2, 3) and shift the grid (torch pads (3, 3)).

    Given `kept_index` [B, K] (and the patch `grid` side), the conv is evaluated only
    inside kept patches (`sparse_conv7x7s2`) and the output is zero elsewhere.
    """

    features: int
    impl: str = "auto"
    grid: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kept_index: jax.Array | None = None) -> jax.Array:
        impl = resolve_conv_impl(self.impl)
        kernel = self.param(
            "kernel", initializers.kaiming_normal, (7, 7, x.shape[-1], self.features)
        ).astype(self.dtype)
        x = x.astype(self.dtype)
        if kept_index is not None:
            return sparse_conv7x7s2(x, kernel, kept_index, self.grid)
        if impl == "xla":
            return jax.lax.conv_general_dilated(
                x, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        padded = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
        taps = _im2col_taps(padded, x.shape[1] // 2, x.shape[2] // 2)
        return matmul_2d(taps, kernel.reshape(-1, self.features))


class ScottTokenizer(nn.Module):
    """SCOTT conv stem with masked-dense "sparse" convolutions (`SparseCNNTokenizer`).

    conv 7x7/2 (no bias) -> ReLU -> MaxBlurPool -> conv 7x7/2 (no bias) -> ReLU ->
    MaxBlurPool: [B, S, S, 3] -> [B, (S/16)², D]. With a keep-mask, masked pixels are
    zeroed at the input and every conv and MaxBlurPool output is re-masked at its own
    resolution, so no information from a masked patch reaches any output and masked
    tokens leave as exact zeros. The max pool *inside* MaxBlurPool is not re-masked
    (faithful to the reference, docs/design.md#tokenizers). Without a mask the stem is dense.

    `max_kept` (static, with a keep-mask and the im2col conv, i.e. on CPU by default) makes
    the convs truly sparse: they are evaluated only inside the kept patches
    (`sparse_conv7x7s2`), which gives the same numbers as computing them densely and
    re-masking, for 40 % of the conv FLOPs at 60 % masking. It must bound every row's kept
    count (the training masks keep exactly `masking.num_kept`); a row that keeps more
    comes out as NaN rather than silently wrong.

    `remat=True` stores only each conv's input and output for the backward pass and
    recomputes the rest (im2col taps, ReLU, masks, pooling): the full-resolution stem
    activations dominate the step's memory at 224 px.
    """

    embed_dim: int
    img_size: int
    stem_dim: int = 64
    conv_impl: str = "auto"
    remat: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        keep_mask: jax.Array | None = None,
        max_kept: int | None = None,
    ) -> jax.Array:
        grid = patch_grid(self.img_size, SCOTT_PATCH_SIZE)
        check_inputs(images, keep_mask, self.img_size, grid)
        batch = images.shape[0]
        x = images.astype(self.dtype)
        impl = resolve_conv_impl(self.conv_impl)
        sparse = keep_mask is not None and max_kept is not None and impl == "im2col"
        if keep_mask is None:

            def remask(y):
                return y
        else:
            active = keep_mask.reshape(batch, grid, grid).astype(self.dtype)

            def remask(y):
                return y * upsample_mask(active, y.shape[1])

        def activate_and_pool(y):
            return remask(max_blur_pool(nn.relu(y)))

        conv = StemConv
        if self.remat:
            conv = nn.remat(StemConv)
            activate_and_pool = jax.checkpoint(activate_and_pool)
        x = remask(x)
        if sparse:
            kept_index, overflow = kept_patches(keep_mask, max_kept)
        for i, features in enumerate((self.stem_dim, self.embed_dim)):
            if sparse:
                y = conv(features, impl, grid, self.dtype, name=f"conv_{i}")(x, kept_index)
            else:
                # The stem conv (3 input channels) stays an XLA conv: im2col does not pay there.
                stage_impl = "xla" if i == 0 else impl
                y = remask(conv(features, stage_impl, dtype=self.dtype, name=f"conv_{i}")(x))
            x = activate_and_pool(y)
        tokens = x.reshape(batch, grid * grid, self.embed_dim)
        if sparse:
            tokens = jnp.where(overflow[:, None, None], jnp.nan, tokens)
        return tokens


class PatchEmbedTokenizer(nn.Module):
    """ViT patch embedding: conv p x p / p with bias; [B, S, S, 3] -> [B, (S/p)², D].

    The official `src/models/vit.py`, `PatchEmbed`.

    The keep-mask is accepted for a uniform interface and only validated: non-overlapping
    patches need no pixel masking, the transformer swaps masked tokens for the mask token.
    `max_kept` (the SCOTT stem's sparsity bound) is accepted and ignored for the same reason.
    """

    embed_dim: int
    img_size: int
    patch_size: int = 16
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = initializers.kaiming_normal  # MOCA: xavier on the flat weight

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        keep_mask: jax.Array | None = None,
        max_kept: int | None = None,
    ) -> jax.Array:
        del max_kept
        grid = patch_grid(self.img_size, self.patch_size)
        check_inputs(images, keep_mask, self.img_size, grid)
        p = self.patch_size
        x = nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=self.kernel_init,
            bias_init=initializers.torch_default_bias(p * p * images.shape[-1]),
            dtype=self.dtype,
            name="proj",
        )(images.astype(self.dtype))
        return x.reshape(images.shape[0], grid * grid, self.embed_dim)


def make_tokenizer(
    kind: str,
    embed_dim: int,
    img_size: int,
    patch_size: int,
    *,
    conv_impl: str = "auto",
    remat: bool = False,
    dtype: jnp.dtype = jnp.float32,
) -> nn.Module:
    """The encoders' tokenizer by name ('scott' or 'vit'), as a submodule named `tokenizer`.

    Call it inside the parent's compact method so that Flax binds the module there. The
    SCOTT stem downsamples by exactly `SCOTT_PATCH_SIZE`, so any other patch size is an
    error rather than a silently different grid.
    """
    if kind == "scott":
        if patch_size != SCOTT_PATCH_SIZE:
            raise ValueError(
                f"the SCOTT tokenizer downsamples by {SCOTT_PATCH_SIZE}; patch_size "
                f"{patch_size} is not supported (use tokenizer='vit' for other sizes)"
            )
        return ScottTokenizer(
            embed_dim, img_size, conv_impl=conv_impl, remat=remat, dtype=dtype, name="tokenizer"
        )
    if kind == "vit":
        return PatchEmbedTokenizer(embed_dim, img_size, patch_size, dtype=dtype, name="tokenizer")
    raise ValueError(f"unknown tokenizer {kind!r}; expected one of {TOKENIZERS}")
