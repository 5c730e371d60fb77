"""PCA figures of patch features (paper §6, Figures 1 and 3).

    python -m scott_jax.visualize --workdir runs/digits --images digits --out pca.png
    python -m scott_jax.visualize --workdir runs/flowers --images a.jpg b.jpg --out pca.png

Writes one PNG row per image: the image (eval transform), the first three principal
components of its patch features as RGB, and the foreground found by thresholding the first
component. As in the paper, the PCA is fitted jointly on the patches of all the given images,
so colours mean the same thing across rows. The features are the frozen encoder's
LayerNorm'd patch features (`evaluators.backbone.load_backbone` + `backbone_features`: the
context encoder by default, `--encoder target` for the EMA one, `--encoder random` for the
untrained baseline). `--images` takes image files, or a dataset name (`digits`,
`oxford_flowers102`, `folder:<path>`, ...) whose first `--num-images` test images are used.

The first component's sign is arbitrary: it is oriented so that the grid's border patches
(mostly background) have a negative mean; foreground is where it exceeds `--threshold`
(0: above the mean of all patches).
"""

import argparse
import functools
import io
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from scott_jax import storage

#: Number of principal components shown as RGB.
NUM_COMPONENTS = 3


class PCA(NamedTuple):
    """A PCA of feature vectors: mean [D] and the leading components [K, D] (unit rows)."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray  # [K], descending


def fit_pca(features: np.ndarray, num_components: int = NUM_COMPONENTS) -> PCA:
    """PCA of all patches of all images jointly: features [M, N, D] (or [P, D]).

    The components are the top right-singular vectors of the centred [M·N, D] matrix, in
    float64 (a few thousand patches: an exact SVD is cheap and deterministic).
    """
    x = np.asarray(features, np.float64).reshape(-1, np.shape(features)[-1])
    if x.shape[0] < 2 or num_components > min(x.shape):
        raise ValueError(
            f"need at least 2 patches and {num_components} <= min(patches, dim); got {x.shape}"
        )
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = singular[:num_components] ** 2 / (x.shape[0] - 1)
    return PCA(mean, vt[:num_components], variance)


def project(features: np.ndarray, pca: PCA) -> np.ndarray:
    """features [..., D] -> their principal-component scores [..., K]."""
    return (np.asarray(features, np.float64) - pca.mean) @ pca.components.T


def orient_to_border(scores: np.ndarray, grid: int) -> np.ndarray:
    """scores [M, N] of one component on a grid x grid patch layout, sign-flipped if needed so
    that the border patches' mean is negative (background low, object high)."""
    layout = scores.reshape(scores.shape[0], grid, grid)
    border = np.ones((grid, grid), bool)
    border[1:-1, 1:-1] = False
    return -scores if layout[:, border].mean() > 0 else scores


def foreground(first: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """bool [M, N]: patches whose (oriented) first-component score exceeds `threshold`."""
    return np.asarray(first) > threshold


def to_rgb(scores: np.ndarray) -> np.ndarray:
    """scores [M, N, 3] -> uint8 [M, N, 3]: each component min-max scaled over all images."""
    low = scores.min(axis=(0, 1), keepdims=True)
    high = scores.max(axis=(0, 1), keepdims=True)
    scaled = (scores - low) / np.maximum(high - low, 1e-12)
    return np.round(255.0 * scaled).astype(np.uint8)


def pca_panels(features: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """features [M, N, D] (N = grid²) -> (RGB uint8 [M, g, g, 3], foreground bool [M, g, g])."""
    num_images, num_patches, _ = features.shape
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} patches are not a square grid")
    scores = project(features, fit_pca(features))  # [M, N, 3]
    scores[..., 0] = orient_to_border(scores[..., 0], grid)
    rgb = to_rgb(scores).reshape(num_images, grid, grid, NUM_COMPONENTS)
    mask = foreground(scores[..., 0], threshold).reshape(num_images, grid, grid)
    return rgb, mask


def grid_image(images: np.ndarray, rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One row per image: image | PCA RGB | foreground (white), each S x S. -> uint8 [M·S, 3·S, 3].

    images uint8 [M, S, S, 3]; rgb [M, g, g, 3] and mask [M, g, g] are upsampled by
    nearest neighbour (each patch a S/g-pixel square, as the patches are).
    """
    size, grid = images.shape[1], rgb.shape[1]
    scale = size // grid

    def upsample(x):
        return np.repeat(np.repeat(x, scale, axis=1), scale, axis=2)

    masks = np.repeat(upsample(mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)
    rows = np.concatenate([images, upsample(rgb), masks], axis=2)  # [M, S, 3S, 3]
    return rows.reshape(-1, *rows.shape[2:])


def load_images(images: Sequence[str], img_size: int, num_images: int):
    """(normalised float32 [M, S, S, 3] for the encoder, uint8 [M, S, S, 3] for display).

    `images`: image files, or one dataset name (its first `num_images` test images). Both go
    through the eval transform (official `src/data/transforms.py`, `get_test_transforms`).
    """
    from scott_jax.data import IMAGENET_MEAN, IMAGENET_STD, Source, eval_batches, load_source

    if len(images) == 1 and storage.is_local(images[0]) and not os.path.isfile(images[0]):
        source = load_source(images[0], "test")
        source = Source(
            source.name,
            "test",
            source.images[:num_images],
            source.labels[:num_images],
            source.num_classes,
        )
    else:
        missing = [path for path in images if not storage.exists(path)]
        if missing:
            raise FileNotFoundError(f"no such image files: {missing}")
        paths = np.asarray([storage.resolve(path) for path in images])
        source = Source("files", "test", paths, np.full(len(paths), -1, np.int32), 0)
    batch = next(eval_batches(source, batch_size=source.num_examples, img_size=img_size))
    normalised = batch["image"]
    pixels = 255.0 * (normalised * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN))
    return normalised, np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def write_figure(
    workdir: str,
    images: Sequence[str],
    out: str,
    *,
    encoder: str = "context",
    num_images: int = 8,
    threshold: float = 0.0,
    zoom: int = 1,
) -> np.ndarray:
    """Computes the figure for a run's encoder and writes it to `out` (PNG); returns it."""
    import jax
    from PIL import Image

    from scott_jax.evaluators.backbone import load_backbone
    from scott_jax.evaluators.features import backbone_features

    if zoom < 1:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    backbone = load_backbone(workdir, encoder=encoder)
    normalised, pixels = load_images(images, backbone.encoder.img_size, num_images)
    features = jax.jit(functools.partial(backbone_features, backbone.encoder))(
        backbone.params, normalised
    )
    rgb, mask = pca_panels(np.asarray(features, np.float32), threshold)
    figure = grid_image(pixels, rgb, mask)
    figure = np.repeat(np.repeat(figure, zoom, axis=0), zoom, axis=1)
    png = io.BytesIO()
    Image.fromarray(figure).save(png, format="PNG")
    storage.makedirs(os.path.dirname(storage.resolve(out)))
    storage.write_bytes(out, png.getvalue())  # a local path or a gs:// URI
    return figure


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scott_jax.visualize", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="a launch.py run directory")
    parser.add_argument("--images", nargs="+", required=True, help="image files or a dataset")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--encoder", default="context", choices=("context", "target", "random"))
    parser.add_argument("--num-images", type=int, default=8, help="for a dataset name")
    parser.add_argument("--threshold", type=float, default=0.0, help="on the first component")
    parser.add_argument("--zoom", type=int, default=1, help="integer upscaling of the figure")
    args = parser.parse_args(argv)
    figure = write_figure(
        args.workdir,
        args.images,
        args.out,
        encoder=args.encoder,
        num_images=args.num_images,
        threshold=args.threshold,
        zoom=args.zoom,
    )
    print(f"wrote {args.out} ({figure.shape[1]}x{figure.shape[0]})")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
