"""SplitMask models: an encoder that sees one subset of the patches, a shallow decoder that
fills in the rest, and the masked-image-modelling head.

SplitMask paper (El-Nouby et al., §4.1–4.3, §5.5): "the original ViT" encoder (absolute
position embeddings, no layer scale, no relative position bias, no [CLS] here since no loss
needs it) processes only the visible tokens of its subset; a decoder of 2 blocks of the same
width reads them back on the full grid, a mask embedding plus the missing patch's position
at every other place. Blocks are I-JEPA's pre-norm ViT blocks (`models.ijepa`: affine LN
eps 1e-6, qkv bias, GELU MLP ×4, final LN); init as BEiT (microsoft/unilm beit): every Linear
N(0, 0.02) with zero bias, pos-embed and mask embedding N(0, 0.02), block i's output
projections divided by √(2i) (1-based). Either tokenizer: the SCOTT stem gets the subset's
keep-mask, so masked pixels never reach a visible token.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from scott_jax.models import initializers
from scott_jax.models.ijepa import Transformer, keep_mask_from
from scott_jax.models.linear import Dense
from scott_jax.models.tokenizers import PatchGrid, make_tokenizer
from scott_jax.models.transformer import LINEAR_STD, gather_tokens, sincos_pos_embed

#: `pos_embed` values: the original ViT's learned table, or SCOTT's fixed row-first sin-cos.
POS_EMBEDS = ("learned", "sincos")
#: `decoder_pos` values: the mask embedding takes the encoder's position embedding at the
#: missing patches ('encoder'), or MAE's separate decoder table is added to every token ('mae').
DECODER_POS = ("encoder", "mae")


def position_table(encoder: "Encoder", encoder_params: dict) -> jax.Array:
    """The encoder's position embedding [N, D] (learned: from its params), which the decoder
    adds to the mask embedding at the missing patches."""
    if encoder.pos_embed == "learned":
        return encoder_params["pos_embed"][0]
    return jnp.asarray(sincos_pos_embed(encoder.embed_dim, encoder.grid_size))


class Encoder(PatchGrid, nn.Module):
    """images [B, S, S, 3] -> [B, N, D] (the whole image: probes, k-NN), or with `visible`
    int [B, K] (a subset's sorted token indices) -> [B, K, D] from those tokens alone.

    Tokenizer -> + position embedding -> gather the subset -> blocks -> final LN.
    """

    tokenizer: str
    img_size: int
    depth: int
    num_heads: int
    embed_dim: int = 384
    patch_size: int = 16
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    depth_rescale_init: bool = True
    pos_embed: str = "learned"
    conv_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, visible: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {self.pos_embed!r}; expected one of {POS_EMBEDS}")
        tokenizer = make_tokenizer(
            self.tokenizer,
            self.embed_dim,
            self.img_size,
            self.patch_size,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
        )
        if visible is not None and self.tokenizer == "scott":
            keep = keep_mask_from(visible, jnp.ones(visible.shape, bool), self.num_patches)
            tokens = tokenizer(images, keep, visible.shape[1])
        else:
            tokens = tokenizer(images)
        if self.pos_embed == "learned":
            pos = self.param(
                "pos_embed",
                initializers.normal(LINEAR_STD),
                (1, self.num_patches, self.embed_dim),
            )[0]
        else:
            pos = jnp.asarray(sincos_pos_embed(self.embed_dim, self.grid_size))
        x = tokens + pos.astype(tokens.dtype)
        if visible is not None:
            x = gather_tokens(x, visible)
        return Transformer(
            self.depth,
            self.num_heads,
            self.mlp_ratio,
            self.drop_path_rate,
            self.depth_rescale_init,
            self.dtype,
            name="transformer",
        )(x, None, train=train)


class Decoder(nn.Module):
    """A branch's encoder outputs on the full grid -> decoded tokens [B, N, D].

    visible_features [B, K, D] (the encoder's final-LN outputs), visible int [B, K] their
    token indices, pos [N, D] the encoder's position table (`position_table`). Every other
    position holds the shared mask embedding m + pos_i ("a mask token that includes the
    position information of the missing patch", paper §4.1); visible tokens are not
    re-embedded. With decoder_pos='mae' the decoder instead adds its own learned table to
    every token, and the mask embedding carries no position before that.
    """

    depth: int = 2
    num_heads: int = 6
    mlp_ratio: float = 4.0
    depth_rescale_init: bool = True
    decoder_pos: str = "encoder"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, visible_features: jax.Array, visible: jax.Array, pos: jax.Array, *, train: bool
    ) -> jax.Array:
        if self.decoder_pos not in DECODER_POS:
            raise ValueError(
                f"unknown decoder_pos {self.decoder_pos!r}; expected one of {DECODER_POS}"
            )
        batch, _, dim = visible_features.shape
        num_patches = pos.shape[0]
        mask = self.param("mask_token", initializers.normal(LINEAR_STD), (1, 1, dim))
        if self.decoder_pos == "encoder":
            fill = mask + pos[None]
        else:
            fill = jnp.broadcast_to(mask, (1, num_patches, dim))
        x = jnp.broadcast_to(fill.astype(self.dtype), (batch, num_patches, dim))
        rows = jnp.arange(batch)[:, None]
        x = x.at[rows, visible].set(visible_features.astype(self.dtype))
        if self.decoder_pos == "mae":
            table = self.param("pos_embed", initializers.normal(LINEAR_STD), (1, num_patches, dim))
            x = x + table.astype(self.dtype)
        return Transformer(
            self.depth,
            self.num_heads,
            self.mlp_ratio,
            0.0,
            self.depth_rescale_init,
            self.dtype,
            name="transformer",
        )(x, None, train=train)


def mim_head(vocab_size: int, dtype=jnp.float32) -> Dense:
    """BEiT's `lm_head`: Linear(D -> V) with bias, N(0, 0.02) weights, zero bias."""
    return Dense(vocab_size, kernel_init=initializers.normal(LINEAR_STD), dtype=dtype)
