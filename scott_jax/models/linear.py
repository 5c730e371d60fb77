"""Linear layers whose contraction is one 2-D matmul.

`x [..., I] @ w [I, O]` written as a dot over the last axis of a rank-3+ `x` has a
weight gradient that contracts over several axes (batch and tokens). XLA canonicalises
such a dot by transposing an operand, and XLA:CPU fuses that transpose into the
element-wise code producing the gradient (LayerNorm and residual backward, the conv
stem's scatter/ReLU backward), which then runs 3-10x slower in transposed order.
Flattening to [M, I] first makes the weight gradient a plain `x2ᵀ @ g2` that the matmul
library reads without a copy: same numbers, and the 224 px pretraining step on CPU ~12 %
faster (docs/performance.md). Reshapes of contiguous leading axes are free.
"""

import jax
from flax import linen as nn


def matmul_2d(x: jax.Array, w: jax.Array, precision=None, preferred_element_type=None) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O], computed as [M, I] @ [I, O] (M = prod(...))."""
    out = jax.lax.dot_general(
        x.reshape(-1, x.shape[-1]),
        w,
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return out.reshape(*x.shape[:-1], w.shape[-1])


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for nn.Dense's contraction (last axis of lhs, first of a 2-D rhs)."""
    (lhs_contract, rhs_contract), batch_dims = dimension_numbers
    if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or rhs.ndim != 2:
        raise ValueError(f"flat_dot_general only does [..., I] x [I, O], got {dimension_numbers}")
    if batch_dims != ((), ()):
        raise ValueError(f"flat_dot_general takes no batch dimensions, got {batch_dims}")
    return matmul_2d(lhs, rhs, precision, preferred_element_type)


class Dense(nn.Dense):
    """`nn.Dense` (same parameters, init and numbers) contracted as one 2-D matmul."""

    dot_general: object = flat_dot_general
