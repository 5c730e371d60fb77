"""MOCA models and assignment functions (Gidaris et al., TMLR 2024, §3; official valeoai/MOCA
`models_moca.py`): the encoder with a [CLS] token and an intermediate output, the condenser
decoder, the weight generators of the dynamic prototype heads, the teacher's online codebook
assignments, its bag of words and queue update, and the KL losses.

The encoder uses I-JEPA's pre-norm block (LN eps 1e-6, qkv / proj biases, exact-GELU MLP), which
is timm's `Block` as MOCA uses it, with either tokenizer: the ViT patch embedding (the paper's)
or the SCOTT stem, which gets the visible set as a keep-mask so that hidden pixels never reach
the student. Init as `MOCA.initialize_weights` / `_init_weights`: xavier-uniform Linears (the
patch-embed conv on its flattened [D, 3·p·p] view, its bias torch's default), zero biases,
LayerNorms 1/0, [CLS] and mask token N(0, 0.02). Position embeddings are this package's fixed
row-first sin-cos tables (MOCA's put the column first; they are constants either way).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from scott_jax.models import initializers
from scott_jax.models.ijepa import LN_EPS, Block, keep_mask_from
from scott_jax.models.linear import Dense
from scott_jax.models.tokenizers import PatchEmbedTokenizer, PatchGrid, make_tokenizer
from scott_jax.models.transformer import LINEAR_STD, gather_tokens, sincos_pos_embed

#: `F.normalize`'s eps in `models_moca.py` (NORMALIZE_EPS).
NORMALIZE_EPS = 1e-5
#: Momentum of the temperature statistic μ̄ (`BoWExtractor.decay`).
MU_DECAY = 0.99

xavier = nn.initializers.xavier_uniform()
#: torch's xavier_uniform_ on the patch-embed weight viewed as [D, 3·p·p] (fan_in 3·p·p, fan_out
#: D); flax's conv fans would multiply both by p·p.
xavier_flat_conv = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(‖x‖, 1e-5), torch's `F.normalize(p=2, eps=1e-5)`."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, NORMALIZE_EPS)


def _blocks(x, depth, num_heads, mlp_ratio, dtype, remat=False) -> list[jax.Array]:
    """The outputs of `depth` xavier-initialised pre-norm blocks, one per block; `remat`
    recomputes each block's insides in the backward pass (same parameters and numbers)."""
    block = nn.remat(Block, static_argnums=(3,)) if remat else Block
    outputs = []
    for i in range(depth):
        x = block(num_heads, mlp_ratio, dtype=dtype, xavier=True, name=f"block_{i}")(x, None, False)
        outputs.append(x)
    return outputs


class Encoder(PatchGrid, nn.Module):
    """MOCA's student / teacher encoder (`ViTEncoder`): tokenizer -> + pos-embed -> keep the
    visible tokens -> prepend [CLS] -> pre-norm blocks -> LN after the last block only.

    images [B, S, S, 3] -> the last layer's LN'd patch tokens [B, N, D] (teacher, probes); with
    ids_keep [B, n] (visible patch indices) only those tokens, [B, n, D]. With `intermediate`
    = ℓ (1-based block, the paper's ℓ; the code's `early_layer` is depth − ℓ) it returns
    (last, block ℓ's raw output), both [B, n, D]; ℓ = depth gives the LN'd last layer, as the
    code's `early_layer=0`. The [CLS] token (`cls_token`) takes part in attention but no loss
    reads it, so it is dropped from every output.
    """

    tokenizer: str
    img_size: int
    depth: int
    num_heads: int
    embed_dim: int = 384
    patch_size: int = 16
    mlp_ratio: float = 4.0
    cls_token: bool = True
    conv_impl: str = "auto"
    remat: bool = False  # gradient checkpointing of the blocks (and the SCOTT stem)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        ids_keep: jax.Array | None = None,
        *,
        intermediate: int | None = None,
    ):
        if self.tokenizer == "vit":
            tokenizer = PatchEmbedTokenizer(
                self.embed_dim,
                self.img_size,
                self.patch_size,
                dtype=self.dtype,
                kernel_init=xavier_flat_conv,
                name="tokenizer",
            )
        else:
            tokenizer = make_tokenizer(
                self.tokenizer,
                self.embed_dim,
                self.img_size,
                self.patch_size,
                conv_impl=self.conv_impl,
                remat=self.remat,
                dtype=self.dtype,
            )
        if ids_keep is not None and self.tokenizer == "scott":
            valid = jnp.ones(ids_keep.shape, bool)
            keep_mask = keep_mask_from(ids_keep, valid, self.num_patches)
            tokens = tokenizer(images, keep_mask, ids_keep.shape[1])
        else:
            tokens = tokenizer(images)
        x = tokens + jnp.asarray(sincos_pos_embed(self.embed_dim, self.grid_size), tokens.dtype)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        extra = 0
        if self.cls_token:
            cls = self.param("cls_token", initializers.normal(LINEAR_STD), (1, 1, self.embed_dim))
            cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
            x, extra = jnp.concatenate([cls, x], axis=1), 1
        if intermediate is not None and not 1 <= intermediate <= self.depth:
            raise ValueError(f"intermediate block {intermediate} is not in [1, {self.depth}]")
        outputs = _blocks(x, self.depth, self.num_heads, self.mlp_ratio, self.dtype, self.remat)
        last = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(outputs[-1])
        last = last[:, extra:]
        if intermediate is None:
            return last
        return last, (last if intermediate == self.depth else outputs[intermediate - 1][:, extra:])


class RowBatchNorm(nn.Module):
    """torch `BatchNorm1d` in train mode over the rows of x [K, H]: batch statistics (biased
    variance, eps 1e-5), affine. The running statistics are never read in pretraining, so
    none are kept."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(0)
        var = jnp.mean(jnp.square(x - mean), 0)
        scale = self.param("scale", nn.initializers.ones, (x.shape[1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[1],))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


class WeightGenerator(nn.Module):
    """A dynamic prototype head's weight generator (`ResWGEN` in `BoWPredictor`, paper §3.2.1):
    codebook [K, D] -> unit prototypes [K, out_dim].

    ĉ = l2n(c); G(c) = l2n(W₂ ReLU(BN(W₁ ĉ)) + b₂ + skip(ĉ)), W₁ without bias, BN over the K
    rows (so prototypes depend on the whole codebook), skip the identity when out_dim = D,
    else a Linear. Always float32: the codebook is small and the prototypes are targets'
    counterparts.
    """

    out_dim: int
    hidden_dim: int

    @nn.compact
    def __call__(self, codebook: jax.Array) -> jax.Array:
        c = l2_normalize(codebook.astype(jnp.float32))
        h = Dense(self.hidden_dim, use_bias=False, kernel_init=xavier, name="b0_fc")(c)
        h = nn.relu(RowBatchNorm(name="b0_bn")(h))
        h = Dense(self.out_dim, kernel_init=xavier, name="b0_last_layer")(h)
        skip = (
            c
            if self.out_dim == c.shape[1]
            else Dense(self.out_dim, kernel_init=xavier, name="skip")(c)
        )
        return l2_normalize(h + skip)


class CondenserDecoder(nn.Module):
    """The condenser decoder (`MOCA.forward_masked_decoder`, paper §3.3).

    avg [B, D] (ā, the mean of the student's last-layer LN'd visible tokens), tokens [B, n, D]
    (block ℓ's raw visible tokens), visible_idx [B, n], masked_idx [B, m] (the partially
    decoded masked tokens M') -> [B, n + m, d], one output per visible and per decoded masked
    token, in that order (ā's output is dropped). Input: P(ā) + e₀, P(LN_c(tokens)) + e_i and
    mask token + e_i, with P one Linear shared by ā and the tokens and e a sin-cos table whose
    row 0 (ā's) is zero; then `depth` pre-norm blocks and a LN.
    """

    grid_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    remat: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, avg, tokens, visible_idx, masked_idx) -> jax.Array:
        batch, d = tokens.shape[0], self.embed_dim
        tokens = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm_in")(tokens)
        x = jnp.concatenate([avg[:, None].astype(tokens.dtype), tokens], axis=1)
        x = Dense(d, kernel_init=xavier, dtype=self.dtype, name="embed")(x)
        table = np.concatenate([np.zeros((1, d), np.float32), sincos_pos_embed(d, self.grid_size)])
        pos = jnp.asarray(table, x.dtype)
        mask_token = self.param("mask_token", initializers.normal(LINEAR_STD), (1, 1, d))
        queries = jnp.broadcast_to(mask_token.astype(x.dtype), (batch, masked_idx.shape[1], d))
        x = jnp.concatenate(
            [x[:, :1] + pos[0], x[:, 1:] + pos[visible_idx + 1], queries + pos[masked_idx + 1]],
            axis=1,
        )
        x = _blocks(x, self.depth, self.num_heads, self.mlp_ratio, self.dtype, self.remat)[-1]
        return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)[:, 1:]


# --------------------------------------------------------------------------- teacher targets


def assign(tokens: jax.Array, codebook: jax.Array, mu: jax.Array, inv_delta: float):
    """Soft codebook assignments of the teacher's tokens (`BoWExtractor.assign_words`, §3.1).

    tokens [B, N, D] (last layer, LN'd), codebook [K, D] (unit rows), mu: the statistic μ̄ of
    the previous step -> (q [B, N, K] float32, d scalar). s = ⟨l2n(t), c_k⟩; q = softmax_k
    ((inv_delta / mu)·s), so τ_T = μ̄ / inv_delta adapts to how peaked the scores are; d is the
    mean over all tokens of (max_k s − mean_k s), which the caller folds into μ̄.
    """
    scores = jnp.einsum(
        "bnd,kd->bnk",
        l2_normalize(tokens.astype(jnp.float32)),
        codebook.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    stat = jnp.mean(scores.max(-1) - scores.mean(-1))
    return jax.nn.softmax(scores * (inv_delta / mu), axis=-1), stat


def interior(grid: int, border: int) -> np.ndarray:
    """Token indices of the grid without `border` rows / columns on each side (row-major)."""
    if grid - 2 * border < 1:
        raise ValueError(f"a {grid}x{grid} grid has no interior with border {border}")
    idx = np.arange(grid * grid).reshape(grid, grid)
    return idx[border : grid - border, border : grid - border].reshape(-1)


def bag_of_words(q: jax.Array, grid: int, border: int) -> jax.Array:
    """Image-level target (`BoWExtractor.compute_bow`): q [..., N, K] -> the L1-normalised
    mean over the interior tokens, [..., K] (border excluded, as OBoW)."""
    bow = q[..., interior(grid, border), :].mean(-2)
    return bow / jnp.maximum(jnp.sum(jnp.abs(bow), -1, keepdims=True), NORMALIZE_EPS)


def insert_words(codebook: jax.Array, ptr: jax.Array, words: jax.Array):
    """The queue update (`BoWExtractor.update`): words [K_new, D] (unit rows) replace the oldest
    rows ptr … ptr + K_new − 1 of codebook [K, D] -> (codebook, (ptr + K_new) mod K). K must
    be a multiple of K_new, so a block never wraps."""
    codebook = jax.lax.dynamic_update_slice(codebook, words.astype(codebook.dtype), (ptr, 0))
    return codebook, ((ptr + words.shape[0]) % codebook.shape[0]).astype(ptr.dtype)


# --------------------------------------------------------------------------- losses


def prototype_logits(features: jax.Array, prototypes: jax.Array, kappa: float) -> jax.Array:
    """κ·⟨f, w_k⟩: features [..., C] (not normalised), prototypes [K, C] -> [..., K] float32."""
    logits = jnp.einsum("...c,kc->...k", features, prototypes.astype(features.dtype))
    return kappa * logits.astype(jnp.float32)


def kl_div(target: jax.Array, logits: jax.Array) -> jax.Array:
    """torch's `kl_div(log_softmax(logits), target, 'batchmean')` over rows [..., K]:
    the mean over rows of Σ_k p_k (log p_k − log q_k), with 0·log 0 = 0. Equals the paper's
    cross-entropy minus the target's entropy, a constant: same gradients (float32)."""
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = target.astype(jnp.float32)
    return jnp.mean(jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_q, -1))
