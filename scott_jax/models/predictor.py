"""MIM-JEPA predictor: context features [B, N, D] -> predicted targets [B, N, D].

The official `src/models/predictor.py`, `Predictor` (docs/design.md#predictor).

A shallow copy of the encoder's transformer (no mask token: it is never called with a
mask, so the reference's unused parameter is not created) that re-adds the
position embedding, followed by the head SiLU -> LayerNorm (affine) -> Linear with
PyTorch's default init.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from scott_jax.models import initializers
from scott_jax.models.linear import Dense, dense_dot_general
from scott_jax.models.transformer import LN_EPS, Transformer


class Predictor(nn.Module):
    """Predicts the target encoder's features at every position from the context's.

    `double_rescale=True` (default, faithful) divides block i's output projections by
    √(2(i+1))·√(2(i+1+backbone_depth)) as the reference does; False keeps only the
    offset factor the reference most likely intended (`Predictor.fix_init_weight`).
    """

    grid_size: int
    num_heads: int
    backbone_depth: int
    depth: int = 3
    ffn_layer: str = "swiglu"
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    attention_dropout: float = 0.0
    stochastic_depth_rate: float = 0.0
    num_register_tokens: int = 0
    double_rescale: bool = True
    fast_dropout: bool | None = None  # None: 16-bit dropout bits on CPU only (models.dropout)
    flat_matmuls: bool | None = None  # None: 2-D matmul layouts on CPU only (models.linear)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, queries: jax.Array | None = None
    ) -> jax.Array:
        """x [B, N, D] (the full context-encoder output) -> [B, N, D].

        With `queries` [B, M] (token indices) -> [B, M, D], the predictions at those tokens
        only: the last block and the head skip the others (the loss reads only the masked
        tokens, so the train step passes those and saves ~(N - M)/N of that work).
        """
        dim = x.shape[-1]
        offsets = (0, self.backbone_depth) if self.double_rescale else (self.backbone_depth,)
        x = Transformer(
            depth=self.depth,
            num_heads=self.num_heads,
            grid_size=self.grid_size,
            ffn_layer=self.ffn_layer,
            mlp_ratio=self.mlp_ratio,
            dropout_rate=self.dropout_rate,
            attention_dropout=self.attention_dropout,
            stochastic_depth_rate=self.stochastic_depth_rate,
            num_register_tokens=self.num_register_tokens,
            use_mask_token=False,
            rescale_offsets=offsets,
            fast_dropout=self.fast_dropout,
            flat_matmuls=self.flat_matmuls,
            dtype=self.dtype,
            name="transformer",
        )(x, train=train, queries=queries)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="head_norm")(nn.silu(x))
        return Dense(
            dim,
            kernel_init=initializers.torch_default_kernel,
            bias_init=initializers.torch_default_bias(dim),
            dtype=self.dtype,
            dot_general=dense_dot_general(self.flat_matmuls),
            name="head",
        )(x)
