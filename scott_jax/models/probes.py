"""Classification probes on frozen patch features [B, N, D] -> logits [B, C] (SPEC §8.2)."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from scott_jax.models import initializers


def _torch_dense(features: int, fan_in: int, name: str) -> nn.Dense:
    """nn.Dense with PyTorch's default nn.Linear init, as the reference's probes use."""
    return nn.Dense(
        features,
        kernel_init=initializers.torch_default_kernel,
        bias_init=initializers.torch_default_bias(fan_in),
        name=name,
    )


class SimpleAttentiveProbe(nn.Module):
    """Attention pooling by learned per-token importance, then a linear classifier.

    w = softmax_N(Linear_D→1(Dropout(x))), Dropout on w in training, pooled = Σ_n w_n·x_n
    over the un-dropped x, logits = Linear_D→C(pooled). The reference's online monitoring
    probe during pretraining (SPEC §6.7) and one of its three evaluation probes.
    """

    num_classes: int
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        dim = x.shape[-1]
        dropped = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        scores = _torch_dense(1, dim, "importance")(dropped)[..., 0]  # [B, N]
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
        pooled = jnp.einsum("bn,bnd->bd", weights, x.astype(jnp.float32))
        return _torch_dense(self.num_classes, dim, "classifier")(pooled)
