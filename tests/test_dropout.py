"""The 16-bit Threefry dropout: drop rate, unbiasedness, independence, sharding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from scott_jax.models import build_predictor, encoder_from_config
from scott_jax.models.dropout import Dropout, dropout, keep_elements


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_each_of_the_four_sub_words_drops_at_the_rate(rate):
    """Element j uses bits 16·(j mod 4) of its call: each position class must drop at
    `rate` (a sub-word that is constant or shared would be off by far more than 5 sigma)."""
    keep = np.asarray(keep_elements(jax.random.key(0), (64, 4096), rate))
    n = keep[:, 0::4].size
    sigma = np.sqrt(rate * (1 - rate) / n)
    for offset in range(4):
        dropped = 1.0 - keep[:, offset::4].mean()
        assert abs(dropped - rate) < 5 * sigma, (offset, dropped)


def test_neighbouring_elements_are_independent():
    """Elements sharing a Threefry call, and neighbouring calls, are uncorrelated."""
    keep = np.asarray(keep_elements(jax.random.key(1), (256, 1024), 0.5), np.float64)
    centred = (keep - keep.mean()).reshape(-1)
    for lag in (1, 2, 3, 4, 1024):
        corr = np.mean(centred[:-lag] * centred[lag:]) / centred.var()
        assert abs(corr) < 5 / np.sqrt(centred.size), (lag, corr)


def test_output_is_the_input_scaled_where_kept_and_unbiased():
    x = jax.random.normal(jax.random.key(2), (32, 196, 196))
    y = np.asarray(dropout(x, 0.1, jax.random.key(3)))
    keep = np.asarray(keep_elements(jax.random.key(3), x.shape, 0.1))
    threshold = round(0.1 * 2**16)
    np.testing.assert_array_equal(y[~keep], 0.0)
    scale = np.float32(2**16 / (2**16 - threshold))
    np.testing.assert_allclose(y[keep], np.asarray(x)[keep] * scale, rtol=1e-6)
    ones = np.asarray(dropout(jnp.ones((1 << 22,)), 0.3, jax.random.key(4)))
    assert abs(ones.mean() - 1.0) < 5 * np.sqrt(0.3 / 0.7 / ones.size)


def test_odd_shapes_keys_and_edge_rates():
    key = jax.random.key(5)
    for shape in [(7,), (3, 5), (2, 3, 1), ()]:
        assert keep_elements(key, shape, 0.5).shape == shape
    same = keep_elements(key, (4, 1001), 0.5)
    np.testing.assert_array_equal(same, keep_elements(key, (4, 1001), 0.5))
    assert not np.array_equal(same, keep_elements(jax.random.key(6), (4, 1001), 0.5))
    # A raw uint32[2] key gives the same bits as the typed key it holds.
    np.testing.assert_array_equal(same, keep_elements(jax.random.key_data(key), (4, 1001), 0.5))
    x = jnp.arange(1.0, 11.0)
    np.testing.assert_array_equal(dropout(x, 0.0, key), x)
    np.testing.assert_array_equal(dropout(x, 1.0, key), jnp.zeros_like(x))


def test_non_threefry_key_is_refused():
    with pytest.raises(ValueError, match="Threefry"):
        keep_elements(jax.random.key(0, impl="rbg"), (4, 8), 0.5)


def test_module_is_the_identity_when_deterministic_and_uses_the_dropout_stream():
    x = jnp.ones((4, 16))
    module = Dropout(0.5)
    np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)
    y = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(7)})
    assert 0 < int((y == 0).sum()) < x.size
    with pytest.raises(Exception, match="dropout"):
        module.apply({}, x, deterministic=False)


def test_mask_does_not_depend_on_the_sharding():
    """The bits are a function of (key, global index): an 8-way sharded array, split on
    either axis, is dropped exactly like the unsharded one."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.random.normal(jax.random.key(8), (16, 4, 24))
    expected = jax.jit(dropout, static_argnums=1)(x, 0.2, jax.random.key(9))
    for spec in (P("data"), P(None, None, "data")):
        sharded = jax.device_put(x, NamedSharding(mesh, spec))
        y = jax.jit(dropout, static_argnums=1)(sharded, 0.2, jax.random.key(9))
        assert len(y.sharding.device_set) == 8
        np.testing.assert_array_equal(y, expected)


def test_fast_dropout_false_is_flax_dropout_in_every_module():
    """`config.model.fast_dropout=False` restores `nn.Dropout` (the exact rate): the module
    then draws flax's mask, and the flag reaches the encoder's and predictor's blocks."""
    x = jnp.ones((4, 64))
    rngs = {"dropout": jax.random.key(10)}
    np.testing.assert_array_equal(
        Dropout(0.3, fast=False).apply({}, x, deterministic=False, rngs=rngs),
        nn.Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs),
    )
    config = common.get_config()
    config.variant, config.img_size = "scott-3/16", 32
    config.model.embed_dim, config.model.depth, config.model.num_heads = 64, 1, 2
    images = jax.random.normal(jax.random.key(11), (2, 32, 32, 3))
    outputs = {}
    for fast in (True, False):
        config.model.fast_dropout = fast
        encoder = encoder_from_config(config)
        predictor = build_predictor(encoder, depth=1)
        assert encoder.fast_dropout is fast and predictor.fast_dropout is fast
        params = jax.jit(encoder.init)(jax.random.key(0), images)
        apply = jax.jit(lambda p, x, e=encoder: e.apply(p, x, train=True, rngs=rngs))
        outputs[fast] = apply(params, images)
    assert not np.allclose(outputs[True], outputs[False])
