"""PCA figures: the PCA and foreground on synthetic features, and the CLI on a tiny run."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from scott_jax import visualize
from scott_jax.checkpoint import Checkpointer
from scott_jax.models import encoder_from_config  # the MIM-JEPA run's encoder


def synthetic_features(rng, num_images=5, grid=4, dim=16):
    """Patch features [M, g², D]: a random object box per image along one direction, plus noise.

    Object patches are +3·u, background -1·u, plus N(0, 0.1²) noise; a second, weaker
    direction v (±1) varies per image, so the first component is ±u and the second ±v.
    """
    u, v = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T
    objects = np.zeros((num_images, grid, grid), bool)
    for m in range(num_images):
        top, left = rng.integers(1, grid - 1, 2)
        objects[m, top : top + 2, left : left + 2] = True
    objects = objects.reshape(num_images, -1)
    features = np.where(objects[..., None], 3.0 * u, -1.0 * u)
    features = features + (np.arange(num_images) % 2 * 2 - 1)[:, None, None] * v
    features = features + 0.1 * rng.standard_normal(features.shape)
    return features, objects, u, v


def test_pca_finds_the_planted_directions_and_the_foreground():
    rng = np.random.default_rng(0)
    features, objects, u, v = synthetic_features(rng)
    pca = visualize.fit_pca(features)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-10)
    assert abs(pca.components[0] @ u) > 0.99 and abs(pca.components[1] @ v) > 0.99
    assert np.all(np.diff(pca.explained_variance) < 0)
    flat = features.reshape(-1, features.shape[-1])
    eigenvalues = np.linalg.eigvalsh(np.cov(flat, rowvar=False))[::-1][:3]
    np.testing.assert_allclose(pca.explained_variance, eigenvalues, rtol=1e-8)
    rgb, mask = visualize.pca_panels(features)
    assert rgb.shape == (5, 4, 4, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255
    np.testing.assert_array_equal(mask.reshape(5, -1), objects)
    # The sign does not depend on the arbitrary sign of the SVD: flipped features, same mask.
    np.testing.assert_array_equal(visualize.pca_panels(-features)[1], mask)


def test_grid_layout_and_bad_input():
    images = np.full((2, 8, 8, 3), 7, np.uint8)
    rgb = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    mask = np.array([[[True, False], [False, False]], [[False, False], [False, True]]])
    figure = visualize.grid_image(images, rgb, mask)
    assert figure.shape == (16, 24, 3)
    assert np.all(figure[:8, :8] == 7)
    np.testing.assert_array_equal(figure[:4, 8:12], np.broadcast_to(rgb[0, 0, 0], (4, 4, 3)))
    assert np.all(figure[:4, 16:20] == 255) and np.all(figure[4:8, 16:24] == 0)
    assert np.all(figure[12:16, 20:24] == 255)
    with pytest.raises(ValueError, match="square grid"):
        visualize.pca_panels(np.zeros((2, 6, 4)))
    with pytest.raises(ValueError, match="at least 2 patches"):
        visualize.fit_pca(np.zeros((1, 1, 4)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A workdir with one checkpoint of a tiny digits encoder (random weights, no training)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_loop import tiny_config

    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config()
    encoder = encoder_from_config(config)
    params = jax.jit(encoder.init)(jax.random.key(1), jnp.zeros((1, 64, 64, 3)))["params"]
    state = {"step": np.int32(1), "params": {"context_encoder": params}, "target_params": params}
    with Checkpointer(workdir / "checkpoints") as checkpointer:
        checkpointer.save(1, state, config.to_dict(), force=True)
    return workdir


def test_cli_writes_a_png_grid_for_a_dataset_and_for_files(tiny_run, tmp_path, capsys):
    out = tmp_path / "digits.png"
    args = ["--workdir", str(tiny_run), "--out", str(out)]
    visualize.main([*args, "--images", "digits", "--num-images", "3", "--zoom", "2"])
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.size == (2 * 3 * 64, 2 * 3 * 64)
    files = []
    for i, size in enumerate([(40, 30), (90, 120)]):
        files.append(tmp_path / f"image_{i}.png")
        pixels = np.random.default_rng(i).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(files[-1])
    figure = visualize.write_figure(
        str(tiny_run), [str(f) for f in files], str(out), encoder="target"
    )
    assert figure.shape == (2 * 64, 3 * 64, 3)
    with Image.open(out) as written:
        np.testing.assert_array_equal(np.asarray(written), figure)
    with pytest.raises(FileNotFoundError, match="no such image files"):
        visualize.write_figure(str(tiny_run), [str(files[0]), "missing.png"], str(out))
