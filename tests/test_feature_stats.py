"""The feature diagnostics (scott_jax.feature_stats) on features with known answers."""

import itertools

import numpy as np
import pytest

from scott_jax.feature_stats import effective_rank, logistic_accuracy, mean_cosine


def test_effective_rank_counts_equal_directions():
    rng = np.random.default_rng(0)
    line = rng.normal(size=(500, 1)) * rng.normal(size=(1, 16))
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    # Four equal-variance, uncorrelated directions (all sign patterns on an orthonormal
    # basis): rank 4.
    basis = np.linalg.qr(rng.normal(size=(16, 4)))[0].T
    codes = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))
    assert effective_rank(codes @ basis) == pytest.approx(4.0, rel=0.02)
    # One direction 10x larger than three others: eigenvalues 100, 1, 1, 1 -> about 1.18.
    scaled = codes * np.array([10.0, 1.0, 1.0, 1.0])
    assert 1.0 < effective_rank(scaled @ basis) < 1.5


def test_mean_cosine_of_alike_and_orthogonal_rows():
    assert mean_cosine(np.tile([[1.0, 2.0, 3.0]], (5, 1))) == pytest.approx(1.0)
    assert mean_cosine(np.eye(6)) == pytest.approx(0.0, abs=1e-7)
    # Pairs (a, -a) and (b, -b), a orthogonal to b: cosines -1, -1 and 0 (four pairs) -> -1/3.
    rows = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert mean_cosine(rows) == pytest.approx(-1.0 / 3.0)


def test_standardising_recovers_a_small_signal_under_a_large_shared_component():
    """Labels in one dimension 1e-4 the size of a shared offset dimension and of noise in
    others: standardisation (and only it) puts the signal on the same scale."""
    rng = np.random.default_rng(0)

    def sample(n):
        labels = rng.integers(0, 2, n)
        x = np.concatenate(
            [
                1e3 + rng.normal(size=(n, 1)) * 10.0,  # shared, large, label-free
                (labels[:, None] * 2.0 - 1.0) * 1e-3,  # the signal, tiny
                rng.normal(size=(n, 4)) * 5.0,  # label-free noise
            ],
            axis=1,
        )
        return x, labels

    (train_x, train_y), (test_x, test_y) = sample(40), sample(400)
    assert logistic_accuracy(train_x, train_y, test_x, test_y, standardise=True) == 100.0
    assert logistic_accuracy(train_x, train_y, test_x, test_y, standardise=False) < 75.0
