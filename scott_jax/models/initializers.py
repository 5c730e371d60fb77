"""Initializers that reproduce the PyTorch reference's init (docs/design.md#initialisation).

JAX's `truncated_normal` truncates at ±2σ and shrinks the std, whereas torch's
`trunc_normal_(std=s)` truncates at *absolute* ±2, which for the small stds used here
is an untruncated normal. Torch's default `nn.Linear`/`nn.Conv2d` init is
U(±1/√fan_in) for weight and bias.
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

#: torch `kaiming_normal_` (fan_in, gain √2, untruncated): the SCOTT convs and the ViT
#: patch-embed conv. Flax's `he_normal` is truncated, so it is not used.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

#: torch default `nn.Linear` weight init, U(±1/√fan_in) (kaiming_uniform with a=√5).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def normal(std: float) -> jax.nn.initializers.Initializer:
    """Untruncated N(0, std²): what torch's `trunc_normal_(std)` gives for std ≪ 2."""
    return nn.initializers.normal(stddev=std)


def torch_default_bias(fan_in: int) -> jax.nn.initializers.Initializer:
    """torch default bias init U(±1/√fan_in); the bias shape alone does not know fan_in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
