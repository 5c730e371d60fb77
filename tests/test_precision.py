"""Numerics of the speed and memory options: max-pool gradient, remat, bfloat16 compute."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from scott_jax import masking, optim
from scott_jax.methods import mim_jepa
from scott_jax.models import build_encoder
from scott_jax.models.tokenizers import max_pool_2x2
from scott_jax.sharding import make_mesh

sys.path.insert(0, str(Path(__file__).parents[1]))  # for `configs`
from configs import common
from configs import mim_jepa as config_mim_jepa


def test_max_pool_matches_reduce_window_forward_and_gradient():
    x = jax.random.normal(jax.random.key(0), (2, 9, 10, 3))
    grad = jax.random.normal(jax.random.key(1), (2, 8, 9, 3))

    def reference(x):
        return nn.max_pool(x, (2, 2), strides=(1, 1), padding="VALID")

    np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
    np.testing.assert_allclose(
        jax.vjp(max_pool_2x2, x)[1](grad)[0], jax.vjp(reference, x)[1](grad)[0], atol=1e-6
    )


def test_max_pool_gradient_goes_to_the_first_maximum_in_row_major_order():
    """Ties (e.g. ReLU zeros) route the whole gradient to the window's top-left, as PyTorch."""
    x = jnp.ones((1, 3, 3, 1))
    grad = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    dx = jax.vjp(max_pool_2x2, x)[1](grad)[0]
    expected = np.zeros((1, 3, 3, 1), np.float32)
    expected[0, :2, :2, 0] = [[1, 2], [3, 4]]
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize("tokenizer", ["scott-7/16", "vit-7/16"])
def test_remat_gives_the_same_outputs_and_gradients(tokenizer):
    """Remat only changes what is stored: the same dropout draws, outputs and gradients
    (the remat model also runs the sparse SCOTT stem, `max_kept`, against the dense one)."""
    kwargs = dict(embed_dim=32, depth=2, num_heads=2)
    plain = build_encoder(tokenizer, 32, **kwargs)
    remat = build_encoder(tokenizer, 32, remat=True, **kwargs)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    keep = jnp.asarray([[1, 0, 1, 1], [0, 1, 1, 0]], jnp.int32)
    params = jax.jit(plain.init)(jax.random.key(1), images)["params"]
    rngs = {"dropout": jax.random.key(2), "drop_path": jax.random.key(3)}

    def loss(model, params):
        max_kept = 3 if model.remat else None
        out = model.apply(
            {"params": params}, images, keep, train=True, max_kept=max_kept, rngs=rngs
        )
        return jnp.sum(out * jnp.sin(out)), out

    (loss_a, out_a), grads_a = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(
        params
    )
    (loss_b, out_b), grads_b = jax.jit(jax.value_and_grad(lambda p: loss(remat, p), has_aux=True))(
        params
    )
    np.testing.assert_allclose(out_b, out_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads_a))


def digits_losses(compute_dtype: str, steps: int, batch: int = 16, img_size: int = 32):
    """MIM-JEPA losses of a tiny SCOTT on scikit-learn digits (8x8 -> 32 px), one device."""
    from sklearn.datasets import load_digits

    config = config_mim_jepa.apply(common.get_config())
    config.variant, config.img_size, config.batch_size = "scott-3/16", img_size, batch
    config.model.embed_dim, config.model.depth, config.model.num_heads = 32, 1, 2
    config.predictor.depth = 1
    config.compute_dtype = compute_dtype
    lengths = optim.RunLengths(steps, steps, steps // 10)
    trainer = mim_jepa.build_trainer(config, lengths, make_mesh(jax.devices()[:1]), source=None)
    images = load_digits().images.astype(np.float32) / 8.0 - 1.0
    scale = img_size // 8
    images = np.repeat(np.repeat(images, scale, 1), scale, 2)[..., None].repeat(3, -1)
    state = trainer.init(jax.random.key(0))
    losses = []
    for step in range(steps):
        x = images[np.random.default_rng(step).choice(len(images), batch, replace=False)]
        keep = masking.keep_masks(0, step, batch, img_size // 16, 0.6).astype(np.int32)
        state, metrics = trainer.step(state, {"context": x, "target": x, "keep_mask": keep})
        losses.append(metrics["loss"])
    return np.asarray(jax.device_get(losses), np.float64)


def test_bfloat16_loss_tracks_float32_on_digits():
    """A few hundred steps: bf16 compute learns as float32 does, within 5% per 20-step window.

    Measured: the windowed means differ by < 0.5%, while the loss falls about 20x; a
    bf16 path that broke the LayerNorms, softmax or the loss reduction would leave it.
    """
    steps, window = 120, 20
    f32 = digits_losses("float32", steps)
    bf16 = digits_losses("bfloat16", steps)
    assert np.isfinite(bf16).all()
    assert f32[-window:].mean() < 0.2 * f32[:window].mean()  # it learns
    f32_windows = f32.reshape(-1, window).mean(1)
    bf16_windows = bf16.reshape(-1, window).mean(1)
    np.testing.assert_allclose(bf16_windows, f32_windows, rtol=0.05)
