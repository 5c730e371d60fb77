"""Targets and masked Smooth-L1 loss (official `src/mimjepa.py`; docs/design.md#objective)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scott_jax import objectives

FIXTURE = Path(__file__).parent / "fixtures" / "parity.npz"

# Jitted once per input signature: compiling each eager op separately is slower.
masked_smooth_l1 = jax.jit(objectives.masked_smooth_l1)
target_features = jax.jit(objectives.target_features)


def reference_loss(pred, target, keep):
    """`ReconstructionLoss` in float64, written as the reference does (mask both operands)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    drop = 1.0 - np.asarray(keep, np.float64)
    d = np.abs(pred * drop[..., None] - target * drop[..., None])
    elementwise = np.where(d < 1.0, 0.5 * d**2, d - 0.5)
    per_token = (elementwise.sum(-1) + 1e-8) / pred.shape[-1]
    return float((per_token.sum(-1) / (drop.sum(-1) + 1e-8)).mean())


def random_case(seed=0, batch=3, tokens=10, dim=8, kept=4):
    """pred, target [B, N, D] float32 and a keep-mask [B, N] with `kept` ones per row."""
    rng = np.random.default_rng(seed)
    pred = rng.normal(scale=1.5, size=(batch, tokens, dim)).astype(np.float32)
    target = rng.normal(size=(batch, tokens, dim)).astype(np.float32)
    keep = np.zeros((batch, tokens), np.int32)
    for row in keep:
        row[rng.choice(tokens, kept, replace=False)] = 1
    return pred, target, keep


def test_hand_computed_example():
    # One sample, 3 tokens, D = 2; token 0 is kept (its huge error must not count).
    target = np.zeros((1, 3, 2), np.float32)
    pred = np.array([[[100.0, -50.0], [0.5, -2.0], [0.0, 3.0]]], np.float32)
    keep = np.array([[1, 0, 0]])
    # |d| < 1: 0.5·d²; |d| >= 1: |d| − 0.5.  Token 1: 0.125 + 1.5; token 2: 0 + 2.5.
    tokens = [(0.0 + 1e-8) / 2, (0.125 + 1.5 + 1e-8) / 2, (2.5 + 1e-8) / 2]
    expected = sum(tokens) / (2 + 1e-8)
    loss = masked_smooth_l1(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(keep))
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, rtol=1e-7)
    np.testing.assert_allclose(loss, 1.03125, rtol=1e-7)


def test_epsilon_terms():
    # With a perfect prediction only the 1e-8 terms remain: N·(1e-8/D) / (M + 1e-8) per sample.
    pred, _, keep = random_case(tokens=10, dim=2, kept=4)
    loss = masked_smooth_l1(pred, pred, keep)
    np.testing.assert_allclose(loss, 10 * 1e-8 / 2 / 6, rtol=1e-5)


def test_matches_reference_formula_and_ignores_kept_positions():
    pred, target, keep = random_case()
    loss = masked_smooth_l1(pred, target, keep)
    np.testing.assert_allclose(loss, reference_loss(pred, target, keep), rtol=1e-6)
    # Both branches of the Smooth-L1 are exercised.
    d = np.abs(pred - target)[keep == 0]
    assert (d < 1).any() and (d >= 1).any()
    # Anything at kept positions, in pred or target, leaves the loss unchanged.
    noise = np.random.default_rng(1).normal(scale=10.0, size=pred.shape).astype(np.float32)
    kept = keep.astype(bool)[..., None]
    moved = masked_smooth_l1(np.where(kept, noise, pred), np.where(kept, -noise, target), keep)
    assert float(moved) == float(loss)
    # A boolean mask gives the same value.
    assert float(masked_smooth_l1(pred, target, keep.astype(bool))) == float(loss)


def test_gradient_only_at_masked_positions():
    pred, target, keep = random_case(seed=2)
    grad = jax.jit(jax.grad(objectives.masked_smooth_l1))(
        jnp.asarray(pred), jnp.asarray(target), jnp.asarray(keep)
    )
    kept = keep.astype(bool)
    assert np.all(np.asarray(grad)[kept] == 0.0)
    assert np.all(np.abs(np.asarray(grad)[~kept]).sum(-1) > 0)


def test_low_precision_inputs_are_reduced_in_float32():
    pred, target, keep = random_case(seed=3)
    pred16, target16 = jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16)
    loss = masked_smooth_l1(pred16, target16, keep)
    assert loss.dtype == jnp.float32
    expected = reference_loss(
        np.asarray(pred16, np.float32), np.asarray(target16, np.float32), keep
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_rejects_mismatched_shapes():
    pred, target, keep = random_case()
    with pytest.raises(ValueError):
        masked_smooth_l1(pred, target[:, :-1], keep)
    with pytest.raises(ValueError):
        masked_smooth_l1(pred, target, keep[:, :-1])


def test_target_features_are_normalised_and_detached():
    x = jnp.asarray(np.random.default_rng(4).normal(3.0, 2.0, size=(2, 5, 16)), jnp.float32)
    t = target_features(x)
    x64 = np.asarray(x, np.float64)
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(t, expected, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda f: jnp.sum(objectives.target_features(f) * jnp.arange(16.0)))(x)
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("model", ["scott", "vit", "scott_mlp_reg"])
def test_parity_with_reference_loss(model):
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} not generated (tests/fixtures/make_parity_fixture.py)")
    with np.load(FIXTURE) as data:
        pred = data[f"{model}/out/predictor"]
        dense = data[f"{model}/out/encoder_dense"]
        expected = data[f"{model}/out/loss"]
        keep = data["keep_mask"]
    loss = masked_smooth_l1(pred, target_features(jnp.asarray(dense)), keep)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_loss_from_the_masked_tokens_alone_equals_the_full_loss():
    """`smooth_l1_at_masked` on the gathered masked tokens: the full loss's value (with
    its 1e-8 terms of the kept tokens) and gradient, and `masked_tokens` flags rows that
    mask a different number of tokens."""
    pred, target, keep = random_case(seed=4, batch=4, tokens=12, dim=6, kept=5)
    index, exact = objectives.masked_tokens(keep, 7)
    assert exact.all()
    for row, idx in zip(keep, np.asarray(index), strict=True):
        np.testing.assert_array_equal(idx, np.flatnonzero(row == 0))

    def at_masked(pred):
        gather = lambda x: jnp.take_along_axis(x, index[..., None], axis=1)  # noqa: E731
        return objectives.smooth_l1_at_masked(gather(pred), gather(target), 12)

    loss, grad = jax.jit(jax.value_and_grad(at_masked))(pred)
    full_loss, full_grad = jax.jit(jax.value_and_grad(objectives.masked_smooth_l1))(
        pred, target, keep
    )
    np.testing.assert_allclose(loss, reference_loss(pred, target, keep), rtol=1e-6)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, full_grad, rtol=1e-6, atol=1e-12)
    # With pred == target only the 1e-8 terms are left, those of the kept tokens included.
    np.testing.assert_allclose(at_masked(target), reference_loss(target, target, keep), rtol=1e-5)
    keep[1, np.flatnonzero(keep[1] == 0)[0]] = 1  # row 1 masks 6 tokens now
    np.testing.assert_array_equal(objectives.masked_tokens(keep, 7)[1], [1, 0, 1, 1])
