"""SplitMask's discrete targets: visual words from a fixed vocabulary, no trained tokenizer.

SplitMask paper (El-Nouby et al., §3.3, Table 2, §5.5): each 16x16 patch becomes the index of
the vocabulary vector e_i (unit norm) with the highest xᵀe_i, x the patch's pixels read at
half resolution (8x8x3 = 192 values per patch at 224 px). The vocabulary is random
projections (the default of every target-data run), random patches or k-means centroids of
training patches; Table 2 finds them equivalent. docs/deviations.md lists the readings chosen
where the paper is silent (pixel scale, uniform range, 2x2 average pool instead of Lanczos).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from scott_jax.data.augment_spec import IMAGENET_MEAN, IMAGENET_STD

TARGETS = ("random_projection", "random_patches", "kmeans")
#: The random projections' component distribution: U[0, 1) or U[−1, 1), then normalised.
VOCAB_DISTS = ("uniform", "symmetric")
#: The tokenizer's pixels: [0, 1] (ToTensor scale) or the mean/std-normalised network input.
TOKEN_PIXELS = ("unit", "normalized")
_VOCAB_STREAM = 0x766F6361  # "voca"


def tokenizer_patches(images: jax.Array, patch_size: int, pixels: str = "unit") -> jax.Array:
    """Network inputs [B, S, S, 3] (ImageNet-normalised) -> tokenizer patches [B, N, d].

    The image is average-pooled 2x2 (BEiT's second, half-size view), then cut into the
    (patch_size/2)² pixel patches of the ViT grid, flattened (row, col, channel):
    d = 3·(patch_size/2)², N = (S/patch_size)². pixels='unit' undoes the normalisation.
    """
    if pixels not in TOKEN_PIXELS:
        raise ValueError(f"unknown token pixels {pixels!r}; expected one of {TOKEN_PIXELS}")
    batch, size, _, channels = images.shape
    if patch_size % 2 or size % patch_size:
        raise ValueError(
            f"the tokenizer needs an even patch size that divides the image, got patch "
            f"{patch_size} and image {size}"
        )
    x = images.astype(jnp.float32)
    if pixels == "unit":
        x = x * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)
    half, grid, q = size // 2, size // patch_size, patch_size // 2
    x = x.reshape(batch, half, 2, half, 2, channels).mean(axis=(2, 4))
    x = x.reshape(batch, grid, q, grid, q, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid * grid, q * q * channels)


def normalize_rows(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, 1e-12)


def random_projection_vocab(seed: int, size: int, dim: int, dist: str = "uniform") -> jax.Array:
    """The random-projection vocabulary [size, dim]: e_i = u_i/‖u_i‖, u_i ~ U[0, 1)^dim
    (dist='symmetric': U[−1, 1)^dim). A pure function of `seed`, so nothing is stored."""
    if dist not in VOCAB_DISTS:
        raise ValueError(f"unknown vocabulary distribution {dist!r}; expected one of {VOCAB_DISTS}")
    key = jax.random.fold_in(jax.random.key(seed), _VOCAB_STREAM)
    low = 0.0 if dist == "uniform" else -1.0
    return normalize_rows(jax.random.uniform(key, (size, dim), jnp.float32, low, 1.0))


def tokenize(patches: jax.Array, vocab: jax.Array) -> jax.Array:
    """patches [B, N, d], unit vocab [V, d] -> token ids int32 [B, N]: argmax_i xᵀe_i."""
    scores = jnp.einsum("bnd,vd->bnv", patches.astype(jnp.float32), vocab.astype(jnp.float32))
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def token_perplexity(tokens: jax.Array, size: int) -> jax.Array:
    """exp(entropy) of the batch's token histogram: 1 when every patch gets the same token,
    up to min(size, #tokens) when they spread evenly; a degenerate tokenizer shows at once."""
    counts = jnp.bincount(tokens.reshape(-1), length=size).astype(jnp.float32)
    p = counts / counts.sum()
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def patch_picks(
    target: str, seed: int, num_images: int, num_patches: int, size: int, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """Which training patches build a data vocabulary: (image index [M], token index [M]).

    'random_patches': M = size, each patch from a different image (images are reused, in a
    new random order, only when the dataset has fewer than `size`), at a random position.
    'kmeans': M = min(max_points, num_images·num_patches) distinct patches, uniformly.
    """
    rng = np.random.default_rng([_VOCAB_STREAM, seed])
    if target == "random_patches":
        rounds = math.ceil(size / num_images)
        images = np.concatenate([rng.permutation(num_images) for _ in range(rounds)])[:size]
        return images, rng.integers(0, num_patches, size)
    if target == "kmeans":
        total = num_images * num_patches
        flat = np.sort(rng.choice(total, min(max_points, total), replace=False))
        return flat // num_patches, flat % num_patches
    raise ValueError(f"no training patches for target {target!r}")


def kmeans(points: jax.Array, size: int, iters: int, seed: int, chunk: int = 8192) -> jax.Array:
    """Euclidean k-means (Lloyd) of points [M, d] -> `size` centroids [size, d].

    Starts from `size` distinct random points; an empty cluster keeps its centroid. The
    assignment runs over chunks of `chunk` points, so memory is O(chunk·size).
    """
    num_points, dim = points.shape
    if num_points < size:
        raise ValueError(f"k-means needs at least {size} points, got {num_points}")
    rng = np.random.default_rng([_VOCAB_STREAM, seed, 1])
    centroids = points[np.sort(rng.choice(num_points, size, replace=False))]
    pad = -num_points % chunk
    weight = jnp.concatenate([jnp.ones(num_points), jnp.zeros(pad)]).reshape(-1, chunk)
    chunks = jnp.concatenate([points, jnp.zeros((pad, dim), points.dtype)]).reshape(-1, chunk, dim)

    def assign(c, xs):
        x, w = xs
        nearest = jnp.argmax(x @ c.T - 0.5 * jnp.sum(c * c, -1), axis=-1)  # argmin ‖x − c‖²
        sums = jax.ops.segment_sum(x * w[:, None], nearest, size)
        return c, (sums, jax.ops.segment_sum(w, nearest, size))

    def update(_, c):
        _, (sums, counts) = jax.lax.scan(assign, c, (chunks, weight))
        sums, counts = sums.sum(0), counts.sum(0)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    return jax.jit(lambda c: jax.lax.fori_loop(0, iters, update, c))(jnp.asarray(centroids))
