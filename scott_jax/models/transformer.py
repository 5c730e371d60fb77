"""The SCOTT transformer (official `src/models/transformer.py`): CCT-style blocks over [B, N, D].

Each block is x <- x + DropPath(Attn(LN(x))); x <- LN(x); x <- x + DropPath(FFN(x)), with
non-affine LayerNorms (eps 1e-5) and no final norm. This is *not* a pre-norm ViT block:
the residual stream itself is re-normalised mid-block (docs/design.md#transformer).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from scott_jax.models import initializers
from scott_jax.models.dropout import Dropout
from scott_jax.models.linear import Dense, dense_dot_general, matmul

LN_EPS = 1e-5
LINEAR_STD = 0.02
MASK_TOKEN_STD = 1e-6


def layer_norm(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """Non-affine LayerNorm over the last axis, computed in float32 (torch `F.layer_norm`)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def sincos_pos_embed(embed_dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid², D], row (h) half first.

    emb[r·grid + c] = [sin(rω), cos(rω), sin(cω), cos(cω)], ω_k = 10000^(-k/F), F = D/4.
    Computed in float64 and returned as float32, like the reference's
    `get_2d_sincos_pos_embed` (I-JEPA's and MAE's put the column half first).
    """
    if embed_dim % 4:
        raise ValueError(
            f"embed_dim must be divisible by 4 for the 2-D sin-cos embedding, got {embed_dim}"
        )
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(
        np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij"
    )
    r = np.outer(rows.reshape(-1), omega)
    c = np.outer(cols.reshape(-1), omega)
    return np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1).astype(np.float32)


def swiglu_hidden_dim(embed_dim: int) -> int:
    """Nearest multiple of 128 to 8/3·D, numpy half-to-even rounding (1024 for D = 384)."""
    hidden = int(128 * np.round(8 / 3 * embed_dim / 128))
    if hidden <= 0:
        raise ValueError(f"embed_dim {embed_dim} is too small for the SwiGLU FFN (hidden size 0)")
    return hidden


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, N, D], idx int [B, ...] -> [B, ..., D]: x[b, idx[b, ...]]."""
    flat = idx.reshape(idx.shape[0], -1)
    out = jnp.take_along_axis(x, flat[..., None], axis=1)
    return out.reshape(*idx.shape, x.shape[-1])


def bias_free_dense(
    features: int, std: float, dtype: jnp.dtype, name: str, flat: bool | None = None
) -> Dense:
    """The blocks' linear layers: no bias, kernel N(0, std), `linear.Dense` (2-D matmuls
    when `linear.resolve_flat(flat)`)."""
    return Dense(
        features,
        use_bias=False,
        kernel_init=initializers.normal(std),
        dtype=dtype,
        dot_general=dense_dot_general(flat),
        name=name,
    )


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Per-sample stochastic depth: zero a sample's branch with prob `rate`, rescale the rest."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Kernel(nn.Module):
    """A bias-free Dense layer's parameter alone: 'kernel' [in, out], N(0, std) init.

    For the attention's qkv projection, whose kernel is sliced (q alone at queried
    tokens), while the parameter tree stays that of `nn.Dense`.
    """

    shape: tuple[int, int]
    std: float = LINEAR_STD

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", initializers.normal(self.std), self.shape)


class Attention(nn.Module):
    """Bias-free multi-head self-attention; qkv split q|k|v, heads head-major (`Attention`).

    Both projections are matmuls over [B·N, D] rows (`linear.matmul`): x @ qkv [D, 3D],
    then one transpose to head-major [3, B, H, N, d]; the heads are merged back to
    [B·N, D] before the projection. Contracting the kernels in head-split form instead
    ([D, 3, H, d], [H, d, D]) makes their gradients contract batch and token axes at
    once, which XLA:CPU serves with transposes fused into the gradients' producers: 5-10 %
    slower steps (docs/performance.md). `queries` [B, M] (token indices) computes only
    those rows of the output, [B, M, D]: keys and values still come from all N tokens, so
    each row equals the full output's.
    """

    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout: float = 0.0
    out_init_std: float = LINEAR_STD
    dtype: jnp.dtype = jnp.float32
    fast_dropout: bool | None = None  # None: 16-bit dropout bits on CPU only (models.dropout)
    flat_matmuls: bool | None = None  # None: 2-D matmul layouts on CPU only (models.linear)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, queries: jax.Array | None = None) -> jax.Array:
        batch, dim = x.shape[0], x.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {self.num_heads}")
        heads, head_dim = self.num_heads, dim // self.num_heads

        def split_heads(t: jax.Array) -> jax.Array:
            """[B, L, n·D] -> [n, B, H, L, d]."""
            return t.reshape(batch, t.shape[1], -1, heads, head_dim).transpose(2, 0, 3, 1, 4)

        x = x.astype(self.dtype)
        qkv_kernel = Kernel((dim, 3 * dim), name="qkv")().astype(self.dtype)
        if queries is None:
            q, k, v = split_heads(matmul(x, qkv_kernel, self.flat_matmuls))
        else:
            queried = gather_tokens(x, queries)
            (q,) = split_heads(matmul(queried, qkv_kernel[:, :dim], self.flat_matmuls))
            k, v = split_heads(matmul(x, qkv_kernel[:, dim:], self.flat_matmuls))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * head_dim**-0.5, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        weights = Dropout(self.attention_dropout, self.fast_dropout)(
            weights, deterministic=not train
        )
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
        out = bias_free_dense(dim, self.out_init_std, self.dtype, "proj", self.flat_matmuls)(
            out.transpose(0, 2, 1, 3).reshape(batch, -1, dim)
        )
        return Dropout(self.dropout_rate, self.fast_dropout)(out, deterministic=not train)


class SwiGLU(nn.Module):
    """SiLU(x W1) ⊙ (x W2) -> W3, no biases, no dropout (the reference's `SwiGLUFFN`)."""

    out_init_std: float = LINEAR_STD
    dtype: jnp.dtype = jnp.float32
    flat_matmuls: bool | None = None  # None: 2-D matmul layouts on CPU only (models.linear)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train  # No dropout in the SwiGLU FFN, as in the reference.
        dim = x.shape[-1]
        hidden = swiglu_hidden_dim(dim)
        flat = self.flat_matmuls
        x12 = bias_free_dense(2 * hidden, LINEAR_STD, self.dtype, "w12", flat)(x)
        x1, x2 = jnp.split(x12, 2, axis=-1)
        return bias_free_dense(dim, self.out_init_std, self.dtype, "last_linear", flat)(
            nn.silu(x1) * x2
        )


class Mlp(nn.Module):
    """Linear -> exact GELU -> dropout -> Linear -> dropout, no biases (the 'mlp' FFN)."""

    mlp_ratio: float
    dropout_rate: float = 0.0
    out_init_std: float = LINEAR_STD
    dtype: jnp.dtype = jnp.float32
    fast_dropout: bool | None = None  # None: 16-bit dropout bits on CPU only (models.dropout)
    flat_matmuls: bool | None = None  # None: 2-D matmul layouts on CPU only (models.linear)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dim = x.shape[-1]
        flat = self.flat_matmuls
        x = bias_free_dense(int(dim * self.mlp_ratio), LINEAR_STD, self.dtype, "linear1", flat)(x)
        drop = Dropout(self.dropout_rate, self.fast_dropout)
        x = drop(nn.gelu(x, approximate=False), deterministic=not train)
        x = bias_free_dense(dim, self.out_init_std, self.dtype, "last_linear", flat)(x)
        return drop(x, deterministic=not train)


class Block(nn.Module):
    """CCT-style block (`Block`): output = LN(h) + FFN(LN(h)), h = x + Attn(LN(x))."""

    num_heads: int
    ffn_layer: str = "swiglu"
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    out_init_std: float = LINEAR_STD
    dtype: jnp.dtype = jnp.float32
    fast_dropout: bool | None = None  # None: 16-bit dropout bits on CPU only (models.dropout)
    flat_matmuls: bool | None = None  # None: 2-D matmul layouts on CPU only (models.linear)

    def _drop_path(self, y: jax.Array, train: bool) -> jax.Array:
        if not train or self.drop_path_rate == 0.0:
            return y
        return drop_path(y, self.drop_path_rate, self.make_rng("drop_path"))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, queries: jax.Array | None = None) -> jax.Array:
        """x [B, N, D] -> [B, N, D], or [B, M, D] at the token indices `queries` [B, M].

        `train` may be positional: `nn.remat` needs it as a static positional argument.
        """
        y = Attention(
            self.num_heads,
            self.dropout_rate,
            self.attention_dropout,
            self.out_init_std,
            self.dtype,
            self.fast_dropout,
            self.flat_matmuls,
            name="attn",
        )(layer_norm(x), train=train, queries=queries)
        if queries is not None:
            x = gather_tokens(x, queries)
        x = layer_norm(x + self._drop_path(y, train))
        if self.ffn_layer == "swiglu":
            ffn = SwiGLU(self.out_init_std, self.dtype, self.flat_matmuls, name="ffn")
        elif self.ffn_layer == "mlp":
            ffn = Mlp(
                self.mlp_ratio,
                self.dropout_rate,
                self.out_init_std,
                self.dtype,
                self.fast_dropout,
                self.flat_matmuls,
                name="ffn",
            )
        else:
            raise ValueError(f"unknown ffn_layer {self.ffn_layer!r}; expected 'swiglu' or 'mlp'")
        return x + self._drop_path(ffn(x, train=train), train)


class Transformer(nn.Module):
    """Token preparation + CCT blocks (the reference's `Transformer`): [B, N, D] -> [B, N, D].

    Masked tokens (keep_mask == 0) are replaced by the learnable `mask_token`, register
    tokens are prepended, the fixed sin-cos position embedding (a constant, zero for the
    registers) is added, then position dropout and the blocks; registers are dropped at
    the end. Block i's output projections start at std 0.02 / ∏_o √(2(i+1+o)) over
    `rescale_offsets`: (0,) for the encoder, (0, backbone_depth) for the predictor's
    faithful double rescale (docs/design.md#predictor). `remat=True` recomputes each block's
    activations in the backward pass instead of storing them (same numbers, less memory).
    `queries` [B, M] (token indices, registers not counted) makes the last block compute
    only those tokens: the output is then [B, M, D], equal to the full output gathered there.
    """

    depth: int
    num_heads: int
    grid_size: int
    ffn_layer: str = "swiglu"
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    attention_dropout: float = 0.0
    stochastic_depth_rate: float = 0.0
    num_register_tokens: int = 0
    use_mask_token: bool = True
    rescale_offsets: Sequence[int] = (0,)
    remat: bool = False
    fast_dropout: bool | None = None  # None: 16-bit dropout bits on CPU only (models.dropout)
    flat_matmuls: bool | None = None  # None: 2-D matmul layouts on CPU only (models.linear)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        keep_mask: jax.Array | None = None,
        *,
        train: bool = False,
        queries: jax.Array | None = None,
    ) -> jax.Array:
        batch, length, dim = tokens.shape
        if length != self.grid_size**2:
            grid = self.grid_size
            raise ValueError(f"expected {grid**2} tokens ({grid}x{grid} grid), got {length}")
        x = tokens.astype(self.dtype)
        if self.use_mask_token:
            mask_token = self.param("mask_token", initializers.normal(MASK_TOKEN_STD), (1, 1, dim))
            if keep_mask is not None:
                x = jnp.where(keep_mask[..., None].astype(bool), x, mask_token.astype(self.dtype))
        elif keep_mask is not None:
            raise ValueError("this transformer has no mask token, so it cannot take a keep_mask")
        pos_embed = sincos_pos_embed(dim, self.grid_size)
        if self.num_register_tokens:
            registers = self.param(
                "registers", initializers.normal(LINEAR_STD), (1, self.num_register_tokens, dim)
            )
            x = jnp.concatenate(
                [jnp.broadcast_to(registers, (batch, *registers.shape[1:])).astype(self.dtype), x],
                1,
            )
            pos_embed = np.concatenate(
                [np.zeros((self.num_register_tokens, dim), np.float32), pos_embed]
            )
        x = x + jnp.asarray(pos_embed, self.dtype)
        x = Dropout(self.dropout_rate, self.fast_dropout)(x, deterministic=not train)
        drop_path_rates = np.linspace(0.0, self.stochastic_depth_rate, self.depth)
        last_queries = None
        if queries is not None:
            if self.depth < 1:
                raise ValueError("queries need at least one block to compute them in")
            last_queries = queries + self.num_register_tokens
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        for i in range(self.depth):
            divisor = float(np.prod([np.sqrt(2.0 * (i + 1 + o)) for o in self.rescale_offsets]))
            x = block(
                num_heads=self.num_heads,
                ffn_layer=self.ffn_layer,
                mlp_ratio=self.mlp_ratio,
                dropout_rate=self.dropout_rate,
                attention_dropout=self.attention_dropout,
                drop_path_rate=float(drop_path_rates[i]),
                out_init_std=LINEAR_STD / divisor,
                dtype=self.dtype,
                fast_dropout=self.fast_dropout,
                flat_matmuls=self.flat_matmuls,
                name=f"block_{i}",
            )(x, train, last_queries if i == self.depth - 1 else None)
        return x if queries is not None else x[:, self.num_register_tokens :]
