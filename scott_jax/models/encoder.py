"""Encoder = tokenizer + transformer: images [B, S, S, 3] -> patch features [B, N, D].

Used as both the context encoder (with a keep-mask, in train mode) and the target encoder
(no mask, deterministic). The tokenizer output is sown as `intermediates/tokens` so that
evaluators and tests can read it without a second forward pass.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from scott_jax.models.tokenizers import PatchGrid, make_tokenizer
from scott_jax.models.transformer import Transformer


class Encoder(PatchGrid, nn.Module):
    """SCOTT (`tokenizer='scott'`) or patch-embed ViT (`tokenizer='vit'`) encoder.

    The official `src/models/scott.py`, `SCOTT`, and `src/models/vit.py`, `ViT`: tokenizer,
    then the CCT-style transformer (docs/design.md#tokenizers and #transformer).

    `remat=True` (gradient checkpointing) recomputes the SCOTT stem stages and the
    transformer blocks in the backward pass: same numbers, much less activation memory.
    """

    tokenizer: str
    img_size: int
    depth: int
    num_heads: int
    embed_dim: int = 384
    patch_size: int = 16
    ffn_layer: str = "swiglu"
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    attention_dropout: float = 0.0
    stochastic_depth_rate: float = 0.0
    num_register_tokens: int = 0
    conv_impl: str = "auto"
    remat: bool = False
    fast_dropout: bool | None = None  # None: 16-bit dropout bits on CPU only (models.dropout)
    flat_matmuls: bool | None = None  # None: 2-D matmul layouts on CPU only (models.linear)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        keep_mask: jax.Array | None = None,
        *,
        train: bool = False,
        max_kept: int | None = None,
    ) -> jax.Array:
        """images [B, S, S, 3], keep_mask [B, N] (1 = visible) or None -> [B, N, D].

        `max_kept`: a static bound on the kept patches per row, which lets the SCOTT stem
        skip the masked patches' convolutions (`ScottTokenizer`); same outputs.
        """
        tokenizer = make_tokenizer(
            self.tokenizer,
            self.embed_dim,
            self.img_size,
            self.patch_size,
            conv_impl=self.conv_impl,
            remat=self.remat,
            dtype=self.dtype,
        )
        tokens = tokenizer(images, keep_mask, max_kept)
        self.sow("intermediates", "tokens", tokens)
        return Transformer(
            depth=self.depth,
            num_heads=self.num_heads,
            grid_size=self.grid_size,
            ffn_layer=self.ffn_layer,
            mlp_ratio=self.mlp_ratio,
            dropout_rate=self.dropout_rate,
            attention_dropout=self.attention_dropout,
            stochastic_depth_rate=self.stochastic_depth_rate,
            num_register_tokens=self.num_register_tokens,
            remat=self.remat,
            fast_dropout=self.fast_dropout,
            flat_matmuls=self.flat_matmuls,
            dtype=self.dtype,
            name="transformer",
        )(tokens, keep_mask, train=train)
