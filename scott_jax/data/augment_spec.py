"""The reference's augmentation constants, in one place for both implementations.

They are the values of the official `src/data/transforms.py`, `TransformsPipeline`.

``augment`` applies them with TensorFlow ops inside ``tf.data``; ``device_augment`` applies the
colour part with JAX inside the jitted step. This module imports neither framework.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Values of ``aug``: the colour augmentation of each view (docs/design.md#augmentation);
#: 'moca' also draws a crop per view (MOCA's recipe below).
AUGMENTATIONS = ("none", "same", "diff", "reference", "moca")
#: A view gets the colour ops with probability 0.6; then jitter (p 0.8),
#: grayscale (p 0.1) and blur (p 0.3), each drawn on its own, in a random order.
COLOUR_P = 0.6
JITTER_P = 0.8
GRAYSCALE_P = 0.1
BLUR_P = 0.3
#: ColorJitter strengths: brightness, contrast, saturation (factor ranges 1 -/+ s), hue (turns).
JITTER = (0.4, 0.4, 0.2, 0.1)
#: GaussianBlur: taps of the (square) kernel and the range sigma is drawn from.
BLUR_KERNEL = 9
BLUR_SIGMA = (0.1, 2.0)
#: ITU-R 601-2 luma (0.299, 0.587, 0.114) in PIL's 16-bit fixed point (they sum to 2**16).
LUMA_WEIGHTS = (19595, 38470, 7471)


def check_aug(aug: str) -> None:
    """A clear error for an unknown ``aug`` (raised before any pipeline or step is built)."""
    if aug not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {aug!r}; known: {', '.join(AUGMENTATIONS)}")


#: MOCA's two views (valeoai/MOCA `util/transforms.py`, `DataAugmentationTwoViews`, BYOL's
#: recipe), per view (first, second), in this fixed order after a RandomResizedCrop of its
#: own (bilinear): jitter (``JITTER``), grayscale, Gaussian blur with sigma ~ U(BLUR_SIGMA),
#: solarize (v >= 128 -> 255 - v), then the flip.
MOCA_JITTER_P = (0.8, 0.8)
MOCA_GRAYSCALE_P = (0.2, 0.2)
MOCA_BLUR_P = (1.0, 0.1)
MOCA_SOLARIZE_P = (0.0, 0.2)
#: Taps of MOCA's blur: PIL's GaussianBlur has no cut-off; 13 taps reach 3 sigma at sigma 2.
MOCA_BLUR_KERNEL = 13
