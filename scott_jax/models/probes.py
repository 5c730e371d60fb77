"""Classification probes on frozen patch features [B, N, D] -> logits [B, C].

The official `src/models/classifiers/` and the paper's linear probe (Appendix E). Every probe
takes the backbone's non-affine LayerNorm'd patch features (as `src/eval.py`), computes in
float32 whatever the feature dtype, and draws dropout from the rng stream 'dropout'
(`train=True` only). The reference trains the three attentive probes side by side and reports
the best; the paper's linear probe is not in its code (docs/design.md#probes).

Trainable parameters at D = 384, C = 102 (the reference's counts): simple 39,655; multi
338,026; cross 1,811,430; linear 40,038.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from scott_jax.models import initializers
from scott_jax.models.transformer import LINEAR_STD, LN_EPS, SwiGLU

#: The reference's attentive probes, in the order its best-of-three selection breaks ties
#: within an epoch (numpy argmax over [multi, cross, simple] in `src/eval.py`).
ATTENTIVE_PROBES = ("multi", "cross", "simple")
#: Every probe `build_probes` knows, the paper's linear probe first.
PROBES = ("linear", *ATTENTIVE_PROBES)


def _torch_dense(features: int, fan_in: int, name: str) -> nn.Dense:
    """nn.Dense with PyTorch's default nn.Linear init, as the reference's probes use."""
    return nn.Dense(
        features,
        kernel_init=initializers.torch_default_kernel,
        bias_init=initializers.torch_default_bias(fan_in),
        name=name,
    )


def _layer_norm(name: str) -> nn.LayerNorm:
    """Affine LayerNorm with torch's eps and init (scale 1, bias 0)."""
    return nn.LayerNorm(epsilon=LN_EPS, name=name)


class LinearProbe(nn.Module):
    """The paper's linear probe (Appendix E): mean over N -> LayerNorm -> Linear_D→C.

    The reference code has no linear probe, so its init is an assumption: the LayerNorm
    (affine, eps 1e-5) starts at 1/0 and the Linear has PyTorch's default init, i.e. what a
    plain `nn.Sequential(LayerNorm, Linear)` would get.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # No dropout: the probe is linear in the pooled, normalised features.
        pooled = _layer_norm("norm")(x.astype(jnp.float32).mean(axis=1))  # [B, D]
        return _torch_dense(self.num_classes, x.shape[-1], "classifier")(pooled)


class SimpleAttentiveProbe(nn.Module):
    """Attention pooling by learned per-token importance, then a linear classifier.

    w = softmax_N(Linear_D→1(Dropout(x))), Dropout on w in training, pooled = Σ_n w_n·x_n
    over the un-dropped x, logits = Linear_D→C(pooled). The reference's online monitoring
    probe during pretraining and one of its three evaluation probes
    (`SimpleAttentiveClassifier`).
    """

    num_classes: int
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.astype(jnp.float32)
        dim = x.shape[-1]
        dropped = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        scores = _torch_dense(1, dim, "importance")(dropped)[..., 0]  # [B, N]
        weights = jax.nn.softmax(scores, axis=-1)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
        pooled = jnp.einsum("bn,bnd->bd", weights, x)
        return _torch_dense(self.num_classes, dim, "classifier")(pooled)


class MultiHeadAttentiveProbe(nn.Module):
    """Per-head attention pooling of projected tokens, then a two-layer head.

    The official `MultiHeadAttentiveClassifier`.

    Per head h: w_h = softmax_N(Linear_D→H(Dropout(x))[..., h]) (Dropout on w in training),
    values = LayerNorm(Linear_D→D(Dropout(x))) split head-major into H chunks of D/H, and the
    head's pooled chunk is Σ_n w_h,n·values_n,h. The H chunks concatenate to [B, D], then
    SiLU -> Linear_D→D -> LayerNorm -> SiLU -> Linear_D→C. The two input dropouts draw
    independent masks. PyTorch default init for every Linear, LayerNorms affine (1/0).
    """

    num_classes: int
    num_heads: int = 4
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.astype(jnp.float32)
        batch, length, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f"feature dim {dim} is not divisible by num_heads {self.num_heads}")
        values = _torch_dense(dim, dim, "value")(
            nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        )
        values = _layer_norm("value_norm")(values).reshape(batch, length, self.num_heads, -1)
        scores = _torch_dense(self.num_heads, dim, "importance")(
            nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        )  # [B, N, H]
        weights = jax.nn.softmax(scores, axis=1)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
        pooled = jnp.einsum("bnh,bnhd->bhd", weights, values).reshape(batch, dim)
        hidden = _torch_dense(dim, dim, "hidden")(nn.silu(pooled))
        hidden = nn.silu(_layer_norm("hidden_norm")(hidden))
        return _torch_dense(self.num_classes, dim, "classifier")(hidden)


class CrossAttentiveProbe(nn.Module):
    """One learned query cross-attending to the tokens (V-JEPA's attentive probe).

    The official `CrossAttentiveClassifier`.

    q = Linear_D→D(query) (the query is not normed), k | v = Linear_D→2D(LayerNorm(x)),
    H-head attention with scale (D/H)^-0.5 and attention dropout, proj Linear_D→D + dropout,
    all bias-free; then query <- LayerNorm(query + attn); query <- query + SwiGLU(query)
    (hidden 1024 at D = 384, no dropout); logits = Linear_D→C(LayerNorm(query)). The
    paper's "attentive probe". Init: query and every Linear kernel N(0, 0.02), the classifier
    bias 0, LayerNorms 1/0, no depth rescale.
    """

    num_classes: int
    num_heads: int = 4
    attention_dropout: float = 0.2
    projection_dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.astype(jnp.float32)
        batch, length, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f"feature dim {dim} is not divisible by num_heads {self.num_heads}")
        head_dim = dim // self.num_heads

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(
                features, use_bias=False, kernel_init=initializers.normal(LINEAR_STD), name=name
            )

        query = self.param("query", initializers.normal(LINEAR_STD), (1, 1, dim))
        query = jnp.broadcast_to(query, (batch, 1, dim))
        q = dense(dim, "q")(query).reshape(batch, 1, self.num_heads, head_dim)
        kv = dense(2 * dim, "kv")(_layer_norm("pre_norm")(x))
        k, v = (t.reshape(batch, length, self.num_heads, head_dim) for t in jnp.split(kv, 2, -1))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
        weights = jax.nn.softmax(logits, axis=-1)
        weights = nn.Dropout(self.attention_dropout)(weights, deterministic=not train)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, 1, dim)
        attended = nn.Dropout(self.projection_dropout)(
            dense(dim, "proj")(attended), deterministic=not train
        )
        query = _layer_norm("norm")(query + attended)
        query = query + SwiGLU(name="ffn")(query, train=train)
        pooled = _layer_norm("head_norm")(query[:, 0])  # [B, D]
        return nn.Dense(
            self.num_classes,
            kernel_init=initializers.normal(LINEAR_STD),
            bias_init=nn.initializers.zeros,
            name="classifier",
        )(pooled)


def build_probes(num_classes: int, names: tuple[str, ...] = PROBES) -> dict[str, nn.Module]:
    """The named probes with the reference's settings (4 heads, dropout 0.2; `src/eval.py`)."""
    constructors = {
        "linear": lambda: LinearProbe(num_classes),
        "simple": lambda: SimpleAttentiveProbe(num_classes),
        "multi": lambda: MultiHeadAttentiveProbe(num_classes, num_heads=4),
        "cross": lambda: CrossAttentiveProbe(num_classes, num_heads=4),
    }
    unknown = [name for name in names if name not in constructors]
    if unknown or not names:
        raise ValueError(f"unknown or no probes {list(names)}; known probes: {list(PROBES)}")
    return {name: constructors[name]() for name in names}
