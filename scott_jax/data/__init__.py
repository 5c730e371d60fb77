"""Input pipeline: dataset sources, augmentations and batch streams (SPEC §7).

Importing this package imports TensorFlow (~5 s, CPU only); models and step functions never
import it.
"""

from scott_jax.data.augment import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_box,
    eval_transform,
    normalize,
    random_flip,
    random_resized_crop,
    two_views,
)
from scott_jax.data.pipeline import eval_batches, pretrain_batches, steps_per_epoch
from scott_jax.data.sources import PURPOSES, SOURCES, Source, load_source

__all__ = [
    "AUGMENTATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PURPOSES",
    "SOURCES",
    "Source",
    "crop_box",
    "eval_batches",
    "eval_transform",
    "load_source",
    "normalize",
    "pretrain_batches",
    "random_flip",
    "random_resized_crop",
    "steps_per_epoch",
    "two_views",
]
