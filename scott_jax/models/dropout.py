"""Inverted dropout that draws four elements' randomness from one Threefry call.

Used by the transformer blocks (the probes keep `nn.Dropout` with their own 'rbg' keys,
see `probe.DROPOUT_PRNG`).

`flax.linen.Dropout` draws a 32-bit word per element, and the partitionable Threefry
computes 64 bits to return those 32. In the training step that made the dropout bits
about 5 % of the step on CPU, most of it for the attention weights' dropout over
[B, H, N, N]. Here every Threefry call gives 64 bits, used as four 16-bit uniforms:

- an element is dropped when its uniform u ∈ {0, …, 2¹⁶ − 1} is < t = round(rate · 2¹⁶), so
  the drop probability is t / 2¹⁶, within 2⁻¹⁷ ≈ 7.6e-6 of `rate`;
- kept elements are scaled by 2¹⁶ / (2¹⁶ − t), so the output's expectation is the input
  exactly, as with the reference's `nn.Dropout`;
- the bits are a pure function of (key, element index), so the mask does not depend on
  how the array is sharded (the 8-device step equals the 1-device step).
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax
from jax.extend.random import threefry2x32_p

_LEVELS = 1 << 16  # distinct 16-bit uniform values
_PER_CALL = 4  # 16-bit uniforms from one Threefry call (two 32-bit words)


def _threefry_key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two uint32 words of a Threefry key (typed `jax.random.key` or raw uint32[2])."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(key)
        if "threefry" not in str(impl):
            raise ValueError(f"dropout needs a Threefry PRNG key, got a key of impl {impl}")
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"dropout needs a Threefry key (uint32[2]), got {key.dtype}{key.shape}")
    return key[0], key[1]


def keep_elements(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """bool[shape], True where an element survives dropout at `rate` (module docstring).

    Element j of each last-axis row takes bits 16·(j mod 4) … of Threefry call ⌊j / 4⌋ of
    that row; calls are numbered in row-major order over shape[:-1] + (⌈n / 4⌉,).
    """
    *lead, n = shape if shape else (1,)
    calls = (*lead, -(-n // _PER_CALL))
    if math.prod(calls) >= 2**32:
        raise ValueError(f"dropout over {shape} needs more than 2**32 Threefry calls")
    with jax.named_scope("dropout_bits"):  # the name profile_step.py files these ops under
        counter = jnp.zeros(calls, jnp.uint32)
        stride = 1
        for axis in reversed(range(len(calls))):
            counter += lax.broadcasted_iota(jnp.uint32, calls, axis) * jnp.uint32(stride)
            stride *= calls[axis]
        words = _threefry_key_words(key)
        high, low = threefry2x32_p.bind(*words, jnp.zeros_like(counter), counter)
        mask16 = jnp.uint32(_LEVELS - 1)
        uniforms = jnp.stack([low & mask16, low >> 16, high & mask16, high >> 16], axis=-1)
        uniforms = uniforms.reshape(*lead, calls[-1] * _PER_CALL)[..., :n].reshape(shape)
        return uniforms >= jnp.uint32(round(rate * _LEVELS))


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zero each element of x with probability ≈ `rate`, scale the rest to keep E[x]."""
    threshold = round(rate * _LEVELS)
    if threshold == 0:
        return x
    if threshold >= _LEVELS:
        return jnp.zeros_like(x)
    scale = jnp.asarray(_LEVELS / (_LEVELS - threshold), x.dtype)
    return jnp.where(keep_elements(key, x.shape, rate), x * scale, jnp.zeros_like(x))


class Dropout(nn.Module):
    """`nn.Dropout`'s interface (rate, `deterministic`, the 'dropout' RNG stream).

    `fast=False` (`config.model.fast_dropout=False`) is `nn.Dropout` itself: the exact
    rate, for about twice the cost of the random bits. `fast=None` (the default) is True on
    CPU, where the 16-bit bits were measured faster, and False on accelerators, where they
    were not measured yet (benchmarks/device_check.sh times both).
    """

    rate: float
    fast: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        fast = jax.default_backend() == "cpu" if self.fast is None else self.fast
        if not fast:
            return nn.Dropout(self.rate)(x, deterministic=False, rng=self.make_rng("dropout"))
        return dropout(x, self.rate, self.make_rng("dropout"))
