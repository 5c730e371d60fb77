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
from scott_jax.data.sources import (
    FOLDER_PREFIX,
    IMAGENET100_WNIDS,
    PURPOSES,
    SOURCES,
    SPLITS,
    Source,
    Splits,
    decode_image,
    load_source,
    purpose_splits,
)

__all__ = [
    "AUGMENTATIONS",
    "FOLDER_PREFIX",
    "IMAGENET100_WNIDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PURPOSES",
    "SOURCES",
    "SPLITS",
    "Source",
    "Splits",
    "crop_box",
    "decode_image",
    "eval_batches",
    "eval_transform",
    "load_source",
    "normalize",
    "pretrain_batches",
    "purpose_splits",
    "random_flip",
    "random_resized_crop",
    "steps_per_epoch",
    "two_views",
]
