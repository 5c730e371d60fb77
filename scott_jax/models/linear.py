"""Linear layers whose contraction is one 2-D matmul.

`x [..., I] @ w [I, O]` written as a dot over the last axis of a rank-3+ `x` has a
weight gradient that contracts over several axes (batch and tokens). XLA canonicalises
such a dot by transposing an operand, and XLA:CPU fuses that transpose into the
element-wise code producing the gradient (LayerNorm and residual backward, the conv
stem's scatter/ReLU backward), which then runs 3-10x slower in transposed order.
Flattening to [M, I] first makes the weight gradient a plain `x2ᵀ @ g2` that the matmul
library reads without a copy: same numbers, and the 224 px pretraining step on CPU ~12 %
faster (docs/performance.md). Reshapes of contiguous leading axes are free.

That was measured on XLA:CPU only, so it is the default there and nowhere else: on a GPU or
TPU (`flat_matmuls=None`, `config.model.flat_matmuls`) the encoder and predictor use XLA's
own dot, and `benchmarks/device_check.sh` times both layouts on the next lent GPU.
"""

import jax
from flax import linen as nn


def resolve_flat(flat: bool | None) -> bool:
    """`flat_matmuls`: None means True on CPU, where the layout was measured faster, and
    False on GPUs / TPUs (XLA's own dot over [..., I], not measured to gain there)."""
    return jax.default_backend() == "cpu" if flat is None else bool(flat)


def matmul(x: jax.Array, w: jax.Array, flat: bool | None = None) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O]: `matmul_2d` when `resolve_flat(flat)`, else one
    dot over the last axis. Same numbers either way, up to summation order."""
    if resolve_flat(flat):
        return matmul_2d(x, w)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


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


def auto_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`flat_dot_general` on CPU, `lax.dot_general` on accelerators (`resolve_flat(None)`)."""
    dot = flat_dot_general if resolve_flat(None) else jax.lax.dot_general
    return dot(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def dense_dot_general(flat: bool | None = None):
    """The `dot_general` of a `Dense` for a `flat_matmuls` setting (None: by backend)."""
    if flat is None:
        return auto_dot_general
    return flat_dot_general if flat else jax.lax.dot_general


class Dense(nn.Dense):
    """`nn.Dense` (same parameters, init and numbers) contracted as one 2-D matmul on CPU
    and as XLA's own dot on accelerators; `dot_general=dense_dot_general(flat)` fixes it."""

    dot_general: object = auto_dot_general
