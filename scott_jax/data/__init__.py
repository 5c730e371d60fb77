"""Input pipeline: dataset sources, augmentations and batch streams (docs/design.md).

The names below load their module on first use: ``sources``, ``augment`` and ``pipeline``
import TensorFlow (~5 s, CPU only), while ``augment_spec`` and ``device_augment`` (the colour
augmentation inside the jitted step, in JAX) do not, so a step function can use the latter
without pulling in TensorFlow. Models and step functions never import TensorFlow.
"""

import importlib

_EXPORTS = {
    "augment": (
        "crop_box",
        "eval_transform",
        "normalize",
        "random_flip",
        "random_resized_crop",
        "two_views",
    ),
    "augment_spec": ("AUGMENTATIONS", "IMAGENET_MEAN", "IMAGENET_STD"),
    "pipeline": ("eval_batches", "pretrain_batches", "pretrain_indices", "steps_per_epoch"),
    "sources": (
        "FOLDER_PREFIX",
        "IMAGENET100_WNIDS",
        "PURPOSES",
        "SOURCES",
        "SPLITS",
        "Source",
        "Splits",
        "decode_image",
        "load_source",
        "purpose_splits",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """``scott_jax.data.<name>``: the export ``name``, importing its module on first use."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
