"""I-JEPA models: a context-only ViT encoder and the narrow predictor.

The I-JEPA code's `src/models/vision_transformer.py`, `VisionTransformer` and
`VisionTransformerPredictor` (docs/design.md#i-jepa-models-and-loss).

Both use I-JEPA's pre-norm block, x ← x + Attn(LN(x)); x ← x + MLP(LN(x)), with affine
LayerNorms (eps 1e-6), qkv and projection biases, a GELU MLP of ratio 4 with biases, and
a final affine LayerNorm; not the CCT-style block of the SCOTT transformer. The encoder
uses these blocks with either tokenizer, so SCOTT-vs-ViT differs only in the tokenizer (a choice of
this project); the SCOTT tokenizer gets the context keep-mask and zeroes the other pixels.

Token sets have static padded lengths with validity masks (scott_jax.masking_multiblock):
a padded token is never attended to (its key is masked out), so it cannot change a valid
token's output. Init as I-JEPA after `helper.init_model`: every Linear N(0, 0.02) with zero
bias, LayerNorms 1/0, mask token N(0, 0.02); `depth_rescale_init` divides block i's output
projections by √(2(i+1)), which upstream's re-init undoes.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from scott_jax.models import initializers
from scott_jax.models.linear import Dense
from scott_jax.models.tokenizers import PatchGrid, make_tokenizer
from scott_jax.models.transformer import LINEAR_STD, drop_path, gather_tokens, sincos_pos_embed

LN_EPS = 1e-6


def _dense(features: int, name: str, dtype, std: float = LINEAR_STD, xavier: bool = False) -> Dense:
    """N(0, std) kernels, or xavier-uniform ones (MOCA's init, official `models_moca.py`)."""
    init = nn.initializers.xavier_uniform() if xavier else initializers.normal(std)
    return Dense(features, kernel_init=init, dtype=dtype, name=name)


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


class Attention(nn.Module):
    """Multi-head self-attention with qkv / proj biases over the valid keys only.

    x [B, L, D], valid bool [B, L] or None (all valid) -> [B, L, D].
    """

    num_heads: int
    out_init_std: float = LINEAR_STD
    dtype: jnp.dtype = jnp.float32
    xavier: bool = False  # xavier-uniform kernels instead of N(0, 0.02)

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
        batch, length, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {self.num_heads}")
        head_dim = dim // self.num_heads
        qkv = _dense(3 * dim, "qkv", self.dtype, xavier=self.xavier)(x)
        q, k, v = (
            t.reshape(batch, length, self.num_heads, head_dim) for t in jnp.split(qkv, 3, axis=-1)
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k).astype(jnp.float32)
        if valid is not None:
            logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, dim)
        return _dense(dim, "proj", self.dtype, self.out_init_std, self.xavier)(out)


class Block(nn.Module):
    """I-JEPA's pre-norm ViT block (`vision_transformer.py`, `Block`) with per-sample drop path."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    out_init_std: float = LINEAR_STD
    dtype: jnp.dtype = jnp.float32
    xavier: bool = False  # xavier-uniform kernels instead of N(0, 0.02)

    def _drop_path(self, y: jax.Array, train: bool) -> jax.Array:
        if not train or self.drop_path_rate == 0.0:
            return y
        return drop_path(y, self.drop_path_rate, self.make_rng("drop_path"))

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None, train: bool) -> jax.Array:
        """`train` may be positional: `nn.remat` needs it as a static positional argument."""
        dim = x.shape[-1]
        y = Attention(self.num_heads, self.out_init_std, self.dtype, self.xavier, name="attn")(
            _layer_norm("norm1", self.dtype)(x), valid
        )
        x = x + self._drop_path(y, train)
        y = _dense(int(dim * self.mlp_ratio), "fc1", self.dtype, xavier=self.xavier)(
            _layer_norm("norm2", self.dtype)(x)
        )
        y = _dense(dim, "fc2", self.dtype, self.out_init_std, self.xavier)(
            nn.gelu(y, approximate=False)
        )
        return x + self._drop_path(y, train)


class Transformer(nn.Module):
    """`depth` pre-norm blocks and the final affine LayerNorm: [B, L, D] -> [B, L, D]."""

    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    depth_rescale_init: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None, *, train: bool) -> jax.Array:
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            divisor = np.sqrt(2.0 * (i + 1)) if self.depth_rescale_init else 1.0
            x = Block(
                self.num_heads,
                self.mlp_ratio,
                float(rates[i]),
                LINEAR_STD / float(divisor),
                self.dtype,
                name=f"block_{i}",
            )(x, valid, train=train)
        return _layer_norm("norm", self.dtype)(x)


def keep_mask_from(context_idx: jax.Array, context_valid: jax.Array, num_patches: int):
    """Context index lists [B, K] (+ validity) -> keep-mask [B, N] (1 = context patch)."""
    rows = jnp.arange(context_idx.shape[0])[:, None]
    return (
        jnp.zeros((context_idx.shape[0], num_patches), jnp.int32)
        .at[rows, context_idx]
        .max(context_valid.astype(jnp.int32))
    )


class Encoder(PatchGrid, nn.Module):
    """I-JEPA context / target encoder: tokenizer -> + sin-cos pos-embed -> gather -> ViT.

    images [B, S, S, 3] -> [B, N, D] for the full image (the target encoder, probes), or,
    with context_idx [B, Kc] and context_valid [B, Kc], -> [B, Kc, D] for the context
    tokens only (the context encoder). Padded context slots come out as garbage that
    nothing valid attended to. The pos-embed is SCOTT's row-first sin-cos
    (I-JEPA's own puts the column first; docs/design.md#transformer).
    """

    tokenizer: str
    img_size: int
    depth: int
    num_heads: int
    embed_dim: int = 384
    patch_size: int = 16
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    depth_rescale_init: bool = False
    conv_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        context_idx: jax.Array | None = None,
        context_valid: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        if (context_idx is None) != (context_valid is None):
            raise ValueError("pass both context_idx and context_valid, or neither")
        tokenizer = make_tokenizer(
            self.tokenizer,
            self.embed_dim,
            self.img_size,
            self.patch_size,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
        )
        if context_idx is not None and self.tokenizer == "scott":
            # At most K = context_idx.shape[1] patches are kept: the stem can run sparse.
            keep_mask = keep_mask_from(context_idx, context_valid, self.num_patches)
            tokens = tokenizer(images, keep_mask, context_idx.shape[1])
        else:
            tokens = tokenizer(images)
        x = tokens + jnp.asarray(sincos_pos_embed(self.embed_dim, self.grid_size), tokens.dtype)
        if context_idx is not None:
            x = gather_tokens(x, context_idx)
        return Transformer(
            self.depth,
            self.num_heads,
            self.mlp_ratio,
            self.drop_path_rate,
            self.depth_rescale_init,
            self.dtype,
            name="transformer",
        )(x, context_valid, train=train)


class Predictor(nn.Module):
    """The narrow ViT predictor: context features -> features at target blocks.

    I-JEPA's `VisionTransformerPredictor`.

    context [B, Kc, D] (context-encoder output), context_idx / context_valid [B, Kc],
    target_idx / target_valid [B, M, Kt] -> [B, M, Kt, D]. Each of the M target blocks is
    predicted in its own sequence: the embedded context tokens (+ the predictor's pos-embed
    at their positions) followed by Kt mask tokens carrying the block's positions. So a
    block's prediction depends on the context and on its own positions only, never on the
    other blocks, and only the mask tokens' outputs are returned.
    """

    grid_size: int
    embed_dim: int = 384
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    depth_rescale_init: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        context: jax.Array,
        context_idx: jax.Array,
        context_valid: jax.Array,
        target_idx: jax.Array,
        target_valid: jax.Array,
        *,
        train: bool = False,
    ) -> jax.Array:
        batch, num_context, out_dim = context.shape
        _, num_targets, target_length = target_idx.shape
        pos = jnp.asarray(sincos_pos_embed(self.embed_dim, self.grid_size), self.dtype)
        x = _dense(self.embed_dim, "embed", self.dtype)(context) + pos[context_idx]
        mask_token = self.param(
            "mask_token", initializers.normal(LINEAR_STD), (1, 1, 1, self.embed_dim)
        )
        queries = mask_token.astype(self.dtype) + pos[target_idx]  # [B, M, Kt, P]
        x = jnp.broadcast_to(x[:, None], (batch, num_targets, *x.shape[1:]))
        x = jnp.concatenate([x, queries], axis=2)
        context_valid = jnp.broadcast_to(context_valid[:, None], (batch, num_targets, num_context))
        valid = jnp.concatenate([context_valid, target_valid], axis=2)
        length = num_context + target_length  # sequences in b-major order: [B·M, L, P]
        x = Transformer(
            self.depth,
            self.num_heads,
            self.mlp_ratio,
            self.drop_path_rate,
            self.depth_rescale_init,
            self.dtype,
            name="transformer",
        )(x.reshape(batch * num_targets, length, -1), valid.reshape(-1, length), train=train)
        x = x[:, num_context:].reshape(batch, num_targets, target_length, -1)
        return _dense(out_dim, "proj", self.dtype)(x)
