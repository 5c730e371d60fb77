"""Datasets as (images, labels) per split *purpose* (SPEC §7.3).

A source answers one question: which examples, with which labels, does a given stage of a
run read? The stages are the four purposes:

- ``pretrain``: the self-supervised training set. Labels ride along only for the online
  monitoring probe (SPEC §6.7); the SSL loss never reads them.
- ``probe_train``: the frozen-feature probes' training set (SPEC §8).
- ``probe_select``: held out from ``probe_train`` to choose the probe epoch honestly, instead of
  selecting on test (SPEC §10 item 11).
- ``test``: reported accuracy.

A source knows nothing about augmentation, shuffling, batching or hosts: that is
``scott_jax.data.pipeline``'s job, so a new dataset only has to produce the split arithmetic.
The pipeline reads examples by *index* (``images[i]``, ``labels[i]``), because exact resume skips
whole epochs and batches at the index level, before anything is decoded (``pipeline``).

Offline default: ``digits``, scikit-learn's ``load_digits()`` (1,797 real hand-written digits,
8x8 grayscale 0..16, 10 classes, shipped inside the scikit-learn wheel).
"""

import dataclasses

import numpy as np

SOURCES = ("digits",)
PURPOSES = ("pretrain", "probe_train", "probe_select", "test")

#: Side of the digits images after upsampling from 8x8. 32 px (x4) keeps the smallest
#: RandomResizedCrop (scale 0.2, ~14x14 px) about 3.5 source pixels wide, so crops still
#: show recognisable strokes; any larger base adds no information to an 8x8 original.
DIGITS_BASE_SIZE = 32
#: Digits split constants (see ``_digits_split``).
DIGITS_TEST_FRACTION = 0.3
DIGITS_SELECT_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """One split of one dataset, held in memory and addressed by example index.

    Attributes:
      name: dataset name, one of ``SOURCES``.
      purpose: one of ``PURPOSES``.
      images: uint8 [N, H, W, 3], RGB in [0, 255].
      labels: int32 [N], in [0, num_classes).
      num_classes: number of classes of the dataset (not only those present in this split).
    """

    name: str
    purpose: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{self.name}/{self.purpose}: images must be uint8 [N, H, W, 3], "
                f"got {images.dtype} {images.shape}"
            )
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{self.name}/{self.purpose}: labels must be int32 [{images.shape[0]}], "
                f"got {labels.dtype} {labels.shape}"
            )
        if labels.size and not 0 <= labels.min() <= labels.max() < self.num_classes:
            raise ValueError(
                f"{self.name}/{self.purpose}: labels must lie in [0, {self.num_classes}), "
                f"got [{labels.min()}, {labels.max()}]"
            )

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])


def load_source(
    name: str,
    purpose: str,
    data_dir: str | None = None,
    labels_per_class: int | None = None,
) -> Source:
    """Loads split ``purpose`` of dataset ``name``.

    Args:
      name: one of ``SOURCES``.
      purpose: one of ``PURPOSES``.
      data_dir: where datasets that need a download live; ``digits`` ships with scikit-learn and
        ignores it.
      labels_per_class: only for ``probe_train``: keep this many examples of each class (a fixed,
        seeded draw), for the few-label probes; ``None`` keeps the whole split.
    """
    del data_dir  # Only the digits source exists so far, and it needs no files.
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known sources: {', '.join(SOURCES)}")
    if purpose not in PURPOSES:
        raise ValueError(
            f"unknown split purpose {purpose!r}; known purposes: {', '.join(PURPOSES)}"
        )
    if labels_per_class is not None and purpose != "probe_train":
        raise ValueError(
            f"labels_per_class applies to purpose 'probe_train' only, got purpose {purpose!r}"
        )
    images, labels, num_classes = _digits()
    index = _digits_split(labels)[purpose]
    if labels_per_class is not None:
        index = _per_class_subset(labels, index, labels_per_class, DIGITS_SPLIT_SEED)
    return Source(name, purpose, images[index], labels[index], num_classes)


def _digits() -> tuple[np.ndarray, np.ndarray, int]:
    """All 1,797 digits: uint8 [1797, 32, 32, 3], int32 [1797] labels, 10 classes.

    8x8 gray levels 0..16 are upsampled bilinearly (smooth strokes rather than 4x4 blocks, so
    bicubic crops look like handwriting), scaled to 0..255 and replicated to three channels
    (the models and ImageNet normalisation expect RGB).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    up = _bilinear_matrix(digits.images.shape[1], DIGITS_BASE_SIZE)  # [32, 8]
    gray = np.einsum("oh,nhw,pw->nop", up, digits.images, up) * (255.0 / 16.0)
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    return images, digits.target.astype(np.int32), len(digits.target_names)


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of 1-D bilinear resampling with half-pixel centres.

    The same convention as ``tf.image.resize`` and PIL (edge samples are clamped), written in
    numpy so loading digits needs no TensorFlow.
    """
    centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    centres = np.clip(centres, 0, size_in - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = centres - lo
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.arange(size_out), lo), 1 - frac)
    np.add.at(weights, (np.arange(size_out), hi), frac)
    return weights


def _digits_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted example indices of every purpose, for the digits labels.

    - ``pretrain``: all 1,797 (like the reference's "full" SSL sets, SPEC §7.3: SSL sees the
      test images, never their labels).
    - ``test``: a stratified 30 % (539), seed 0.
    - ``probe_select``: a stratified 20 % of the rest (250), seed 0.
    - ``probe_train``: the remaining 1,008. test, probe_select and probe_train are disjoint.
    """
    everything = np.arange(labels.shape[0])
    rest, test = _stratified_split(labels, everything, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    train, select = _stratified_split(labels, rest, DIGITS_SELECT_FRACTION, DIGITS_SPLIT_SEED)
    return {"pretrain": everything, "probe_train": train, "probe_select": select, "test": test}


def _stratified_split(
    labels: np.ndarray, index: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``index`` into (kept, held out), holding out round(fraction * n_c) of each class c.

    Both parts are sorted; the draw depends only on (labels, index, fraction, seed).
    """
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels[index]):
        members = index[labels[index] == c]
        held.append(rng.permutation(members)[: round(fraction * members.size)])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(index, held), held


def _per_class_subset(
    labels: np.ndarray, index: np.ndarray, per_class: int, seed: int
) -> np.ndarray:
    """Sorted subset of ``index`` with exactly ``per_class`` examples of every class in it."""
    counts = np.bincount(labels[index])
    present = counts[counts > 0]
    if not 1 <= per_class <= present.min():
        raise ValueError(
            f"labels_per_class must be in [1, {present.min()}] (the smallest class of the "
            f"probe_train split), got {per_class}"
        )
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(index[labels[index] == c])[:per_class] for c in np.flatnonzero(counts)
    ]
    return np.sort(np.concatenate(chosen))
