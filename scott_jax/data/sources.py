"""Datasets as (images, labels) per split *purpose*: which examples does a stage of a run read?

Purposes: ``pretrain`` (the SSL set; labels only for the online monitoring probe),
``probe_train`` and ``probe_select`` (the probes' data, with a seeded per-class share held out
to choose the probe epoch instead of selecting on test, as the reference does) and ``test``.
``SPLITS`` is the one place that maps each dataset's purposes to named splits; the default
``pretrain_split='full'`` is the paper's setting (the reference's ``*_full`` datasets).

Sources give random access by index (exact resume skips at the index level) in one of three
storages: ``'pixels'`` (uint8 in memory), ``'encoded'`` (file bytes in memory, the TFDS
datasets) or ``'files'`` (paths: ImageNet-100, ``folder:<path>``); augmentation, shuffling,
batching and hosts are ``scott_jax.data.pipeline``'s job. Unreadable image files are skipped
with a warning, never mid-run. Split tables and where data lives: docs/data.md; the
reference's splits, the ImageNet-100 class list and a recipe to build it:
docs/design.md#data-splits. Offline default: ``digits``.
"""

import collections
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import urllib.request
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from scott_jax import storage
from scott_jax.errors import DataError, MissingDataError

log = logging.getLogger(__name__)

SOURCES = ("digits", "oxford_flowers102", "oxford_iiit_pet", "imagenet100")
#: ``folder:<path>`` names an image tree ``<path>/<split>/<class>/*``.
FOLDER_PREFIX = "folder:"
#: ``tfds:<builder>[?probe=<splits>&test=<splits>]`` names any TFDS image dataset.
TFDS_PREFIX = "tfds:"
PURPOSES = ("pretrain", "probe_train", "probe_select", "test")
#: Image files read from folders, matched case-insensitively (``ImageFolder``'s extensions).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

#: The reference's ImageNet-100 classes (official `src/data/datasets/imagenet100.py`): 100
#: animal wnids among the first ~150 ImageNet-1k classes, not CMC's list
#: (docs/design.md#data-splits). Class index = position in this sorted tuple.
IMAGENET100_WNIDS = tuple(
    """
    n01440764 n01443537 n01484850 n01491361 n01494475 n01496331 n01498041 n01514668 n01514859
    n01531178 n01537544 n01560419 n01582220 n01592084 n01601694 n01608432 n01614925 n01622779
    n01630670 n01632458 n01632777 n01644900 n01664065 n01665541 n01667114 n01667778 n01675722
    n01677366 n01685808 n01687978 n01693334 n01695060 n01698640 n01728572 n01729322 n01729977
    n01734418 n01735189 n01739381 n01740131 n01742172 n01749939 n01751748 n01753488 n01755581
    n01756291 n01770081 n01770393 n01773157 n01773549 n01773797 n01774384 n01774750 n01775062
    n01776313 n01795545 n01796340 n01798484 n01806143 n01818515 n01819313 n01820546 n01824575
    n01828970 n01829413 n01833805 n01843383 n01847000 n01855672 n01860187 n01877812 n01883070
    n01910747 n01914609 n01924916 n01930112 n01943899 n01944390 n01950731 n01955084 n01968897
    n01978287 n01978455 n01984695 n01985128 n01986214 n02002556 n02006656 n02007558 n02011460
    n02012849 n02013706 n02018207 n02018795 n02027492 n02028035 n02037110 n02051845 n02058221
    n02077923
    """.split()
)


@dataclasses.dataclass(frozen=True)
class Splits:
    """Which named splits of a dataset each purpose reads (docs/design.md#data-splits).

    Attributes:
      pretrain: ``pretrain_split`` variant -> the splits it concatenates, in this order.
      probe: the probes' data: ``probe_select`` is a seeded ``select_fraction`` of each class of
        it, ``probe_train`` the rest.
      test: the reported split.
      sizes: examples per split in the reference's copy of the dataset; a loaded split of
        another size is logged as a warning.
      select_fraction: share of every class held out for ``probe_select``.
    """

    pretrain: dict[str, tuple[str, ...]]
    probe: tuple[str, ...]
    test: tuple[str, ...]
    sizes: dict[str, int]
    select_fraction: float = 0.1


#: The split conventions of every named source. Digits has no published split: its ``train``
#: and ``test`` are a fixed stratified 70 / 30 % draw (``_digits_split``).
SPLITS = {
    "digits": Splits(
        pretrain={"full": ("train", "test"), "train": ("train",)},
        probe=("train",),
        test=("test",),
        sizes={"train": 1258, "test": 539},
        select_fraction=0.2,
    ),
    "oxford_flowers102": Splits(
        pretrain={
            "full": ("train", "validation", "test"),
            "trainval": ("train", "validation"),
            "train": ("train",),
        },
        probe=("train", "validation"),
        test=("test",),
        sizes={"train": 1020, "validation": 1020, "test": 6149},
    ),
    "oxford_iiit_pet": Splits(
        pretrain={"full": ("train", "test"), "train": ("train",)},
        probe=("train",),
        test=("test",),
        sizes={"train": 3680, "test": 3669},
    ),
    "imagenet100": Splits(
        pretrain={"full": ("train", "val"), "train": ("train",)},
        probe=("train",),
        test=("val",),
        sizes={"train": 130_000, "val": 5_000},
    ),
}
#: ``folder:`` trees: the probes read ``train``; test reads the first of these that exists.
FOLDER_PROBE_SPLIT = "train"
FOLDER_TEST_SPLITS = ("test", "val", "validation")
FOLDER_SELECT_FRACTION = 0.1
#: Seed of every fixed draw (probe_select, labels_per_class, the digits test split).
SPLIT_SEED = 0

#: A small file from where each TFDS builder downloads, asked for before a download is tried.
_DOWNLOAD_PROBES = {
    "oxford_flowers102": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat",
    "oxford_iiit_pet": "https://thor.robots.ox.ac.uk/~vgg/data/pets/annotations.tar.gz",
}
_NETWORK_TIMEOUT_S = 3.0
_CHECK_CACHE_NAME = ".scott_jax_image_check.json"
#: How many bad or missing names a message lists before "... and N more".
_LIST_AT_MOST = 20

#: Side of the digits images after upsampling from 8x8. 32 px (x4) keeps the smallest
#: RandomResizedCrop (scale 0.2, ~14x14 px) about 3.5 source pixels wide, so crops still
#: show recognisable strokes; any larger base adds no information to an 8x8 original.
DIGITS_BASE_SIZE = 32
DIGITS_TEST_FRACTION = 0.3


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """One split of one dataset, addressed by example index.

    Attributes:
      name: dataset name, one of ``SOURCES`` or ``folder:<path>``.
      purpose: one of ``PURPOSES``.
      images: N entries in one of three storages (``storage`` tells which):
        uint8 [N, H, W, 3] RGB pixels; object [N] of ``bytes``, each an encoded image file
        (JPEG, PNG, ...); or str [N] of image file paths.
      labels: int32 [N], in [0, num_classes); all -1 for an unlabeled dataset.
      num_classes: number of classes of the dataset (not only those present in this split);
        0 for an unlabeled one.
      skipped_files: files of this split that could not be decoded and were left out.
    """

    name: str
    purpose: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    skipped_files: tuple[str, ...] = ()

    def __post_init__(self):
        images, labels, where = self.images, self.labels, f"{self.name}/{self.purpose}"
        if _storage(images) is None:
            raise ValueError(
                f"{where}: images must be uint8 [N, H, W, 3], object [N] of bytes or str [N] "
                f"of paths, got {images.dtype} {images.shape}"
            )
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{where}: labels must be int32 [{images.shape[0]}], "
                f"got {labels.dtype} {labels.shape}"
            )
        if self.num_classes == 0:
            if np.any(labels != -1):
                raise ValueError(f"{where}: an unlabeled source (num_classes 0) needs labels -1")
        elif labels.size and not 0 <= labels.min() <= labels.max() < self.num_classes:
            raise ValueError(
                f"{where}: labels must lie in [0, {self.num_classes}), "
                f"got [{labels.min()}, {labels.max()}]"
            )

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def storage(self) -> str:
        """'pixels', 'encoded' or 'files': how ``images`` holds each example (see above)."""
        return _storage(self.images)


def _storage(images: np.ndarray) -> str | None:
    """The storage of an ``images`` array (``Source``), None if it is none of them."""
    if images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3:
        return "pixels"
    if images.ndim == 1 and images.dtype.kind == "U":
        return "files"
    if images.ndim == 1 and images.dtype == object and all(isinstance(x, bytes) for x in images):
        return "encoded"
    return None


def load_source(
    name: str,
    purpose: str,
    data_dir: str | None = None,
    labels_per_class: int | None = None,
    pretrain_split: str = "full",
) -> Source:
    """Loads split ``purpose`` of dataset ``name`` (splits: ``SPLITS`` and the module doc).

    Args:
      name: one of ``SOURCES``, or ``folder:<path>``.
      purpose: one of ``PURPOSES``.
      data_dir: the TFDS data dir, or the ImageNet-100 root; None: ``$TFDS_DATA_DIR``, else
        ``~/tensorflow_datasets``. ``digits`` and ``folder:`` ignore it.
      labels_per_class: only for ``probe_train``: keep this many examples of each class (a fixed,
        seeded draw), for the few-label probes; ``None`` keeps the whole split.
      pretrain_split: which pretraining set ``purpose='pretrain'`` reads: a key of
        ``SPLITS[name].pretrain`` (``'full'``, the paper's, is in every source); for
        ``folder:``, ``'full'`` (all split folders) or '+'-joined split folder names.
        Other purposes do not read it (an unknown value is still an error).

    Raises:
      ValueError: unknown name, purpose or pretrain_split, a probe or test purpose on an
        unlabeled dataset, or an empty split.
      FileNotFoundError: the dataset (or a split or class folder of it) is not on disk and
        cannot be downloaded; the message says how to get it.
    """
    if purpose not in PURPOSES:
        raise DataError(f"unknown split purpose {purpose!r}; known purposes: {', '.join(PURPOSES)}")
    if labels_per_class is not None and purpose != "probe_train":
        raise DataError(
            f"labels_per_class applies to purpose 'probe_train' only, got purpose {purpose!r}"
        )
    if name.startswith(FOLDER_PREFIX):
        root = name[len(FOLDER_PREFIX) :]
        storage.check(root, "config.data.name folder")
        root = os.path.expanduser(root) if storage.is_local(root) else root.rstrip("/")
        images, labels, num_classes, skipped = _folder(root, purpose, pretrain_split)
        select_fraction = FOLDER_SELECT_FRACTION
    elif name.startswith(TFDS_PREFIX):
        builder_name, overrides = parse_tfds_name(name)
        builder = _tfds_builder(builder_name, data_dir)
        table = tfds_splits(list(builder.info.splits), overrides)
        if purpose == "pretrain" and "+" in pretrain_split:  # as for folders: a+b
            splits = tuple(pretrain_split.split("+"))
        else:
            splits = _splits_of(name, table, purpose, pretrain_split)
        images, labels, num_classes, skipped = _tfds(builder_name, splits, data_dir, builder)
        select_fraction = table.select_fraction
    elif name in SOURCES:
        splits = purpose_splits(name, purpose, pretrain_split)
        loader = {"digits": _digits_splits, "imagenet100": _imagenet100}.get(name, _tfds)
        images, labels, num_classes, skipped = loader(name, splits, data_dir)
        select_fraction = SPLITS[name].select_fraction
    else:
        raise DataError(
            f"unknown dataset {name!r}; known sources: {', '.join(SOURCES)}, "
            f"'{TFDS_PREFIX}<builder>' for any TFDS image dataset, or "
            f"'{FOLDER_PREFIX}<path>' for an image tree <path>/<split>/<class>/*.jpg"
        )
    index = np.arange(labels.shape[0])
    if purpose in ("probe_train", "probe_select"):
        train, select = _stratified_split(labels, index, select_fraction, SPLIT_SEED)
        index = select if purpose == "probe_select" else train
    if labels_per_class is not None:
        index = _per_class_subset(labels, index, labels_per_class, SPLIT_SEED)
    if index.size == 0:
        raise DataError(f"{name}: purpose {purpose!r} has no examples")
    return Source(name, purpose, images[index], labels[index], num_classes, skipped)


def purpose_splits(name: str, purpose: str, pretrain_split: str = "full") -> tuple[str, ...]:
    """The named splits that ``purpose`` reads from source ``name`` (one of ``SOURCES``).

    ``probe_train`` and ``probe_select`` both return the probes' splits; the held-out draw
    between them is made after loading. E.g. flowers ``pretrain`` -> (train, validation, test),
    read by TFDS as ``'train+validation+test'``.
    """
    return _splits_of(name, SPLITS[name], purpose, pretrain_split)


def _splits_of(name: str, splits: Splits, purpose: str, pretrain_split: str) -> tuple[str, ...]:
    if pretrain_split not in splits.pretrain:
        raise DataError(
            f"{name}: unknown pretrain_split {pretrain_split!r}; known: "
            f"{', '.join(splits.pretrain)}"
        )
    if purpose == "pretrain":
        return splits.pretrain[pretrain_split]
    return splits.test if purpose == "test" else splits.probe


def parse_tfds_name(name: str) -> tuple[str, dict[str, tuple[str, ...]]]:
    """'tfds:dtd?probe=train+validation&test=test' -> ('dtd', {'probe': ('train',
    'validation'), 'test': ('test',)}); only 'probe' and 'test' can be given."""
    builder, _, query = name[len(TFDS_PREFIX) :].partition("?")
    overrides = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in ("probe", "test") or not value:
            raise DataError(f"{name}: expected tfds:<builder>[?probe=<a+b>&test=<c>], got {item!r}")
        overrides[key] = tuple(value.split("+"))
    if not builder:
        raise DataError(f"{name}: no TFDS builder name after {TFDS_PREFIX!r}")
    return builder, overrides


def tfds_splits(names: Sequence[str], overrides: dict[str, tuple[str, ...]]) -> Splits:
    """The split table of a TFDS dataset with splits `names` (its builder's, once prepared).

    Defaults: test is 'test', else 'validation', else 'val'; the probes read every other
    split that starts with 'train' or is 'validation' / 'val' not used as test; pretraining
    'full' reads every split (the paper's setting), each split alone by its name, or a
    '+'-joined list (`load_source`).
    `overrides` ('probe', 'test') replace the defaults.
    """
    names = list(names) or [s for v in overrides.values() for s in v]
    test = overrides.get("test") or next(
        ((s,) for s in ("test", "validation", "val") if s in names), ()
    )
    probe = overrides.get("probe") or tuple(
        s for s in names if s not in test and (s.startswith("train") or s in ("validation", "val"))
    )
    if not test or not probe:
        raise DataError(
            f"cannot tell the probe and test splits from the builder's splits {names}: name "
            "them, e.g. tfds:<builder>?probe=train&test=test"
        )
    full = tuple(dict.fromkeys([*names, *probe, *test]))
    return Splits(
        pretrain={"full": full, **{s: (s,) for s in full}}, probe=probe, test=test, sizes={}
    )


def decode_image(contents: tf.Tensor) -> tf.Tensor:
    """An image file's bytes (scalar tf.string) -> uint8 [H, W, 3].

    JPEG, PNG, BMP or GIF (first frame), told apart by content, not extension. Grayscale is
    replicated to 3 channels, palette images are expanded, alpha is dropped: the models and the
    ImageNet normalisation expect RGB.
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


# --------------------------------------------------------------------------- digits


def _digits_splits(name: str, splits: Sequence[str], data_dir: str | None):
    """(images, labels, num_classes, skipped) of the digits ``splits``, in original order."""
    del name, data_dir  # digits ships with scikit-learn.
    images, labels, num_classes = _digits()
    split_index = _digits_split(labels)
    index = np.sort(np.concatenate([split_index[split] for split in splits]))
    return images[index], labels[index], num_classes, ()


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

    The same convention as ``tf.image.resize`` and PIL (edge samples are clamped), in numpy:
    the digits are made once, eagerly, as one array.
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
    """Sorted example indices of the digits ``train`` (1,258) and ``test`` (539) splits.

    ``test`` is a stratified 30 %, seed 0; ``train`` the rest. With ``select_fraction`` 0.2 the
    probes then get 1,008 (probe_train) and 250 (probe_select) examples.
    """
    everything = np.arange(labels.shape[0])
    train, test = _stratified_split(labels, everything, DIGITS_TEST_FRACTION, SPLIT_SEED)
    return {"train": train, "test": test}


# --------------------------------------------------------------------------- TFDS


def _tfds(name: str, splits: Sequence[str], data_dir: str | None, builder=None):
    """(encoded images, labels, num_classes, skipped) of TFDS dataset ``name``'s ``splits``.

    Each split is read once with ``SkipDecoding`` (the JPEG bytes stay encoded: ~10x less
    memory than pixels; the pipeline decodes per example) and sorted by file name, so index i
    is the same example on every host and for every TFDS shard layout. Splits are concatenated
    in the given order.
    """
    import tensorflow_datasets as tfds

    builder = builder or _tfds_builder(name, data_dir)
    features = builder.info.features
    if not {"image", "label"} <= set(features):
        raise DataError(
            f"{name} has no 'image' and 'label' features (it has {sorted(features)}): not an "
            "image classification dataset"
        )
    named = "file_name" in features
    decoders = {
        key: tfds.decode.SkipDecoding()
        for key, feature in features.items()
        if isinstance(feature, tfds.features.Image)
    }
    images, labels = [], []
    for split in splits:
        ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
        ds = ds.map(
            lambda ex: (ex["file_name"] if named else tf.constant(""), ex["image"], ex["label"])
        ).batch(1024)
        parts = list(ds.as_numpy_iterator())
        file_names = np.concatenate([p[0] for p in parts])
        order = np.argsort(file_names, kind="stable")  # TFDS order when there are no names
        images.append(np.concatenate([p[1] for p in parts])[order])
        labels.append(np.concatenate([p[2] for p in parts])[order].astype(np.int32))
        _check_size(name, split, order.size)
    return np.concatenate(images), np.concatenate(labels), features["label"].num_classes, ()


def _tfds_builder(name: str, data_dir: str | None):
    """``tfds.builder(name)``, prepared; downloads only when the data's server answers.

    TFDS itself would retry an unreachable server for minutes before failing; here an absent
    dataset without network fails within seconds with a message that says how to get it.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"TFDS has no dataset {name!r}: {str(e).splitlines()[0]}") from e
    if builder.is_prepared():
        return builder
    probe = _DOWNLOAD_PROBES.get(name) or builder.info.homepage
    if not _reachable(probe):
        root = builder.data_dir_root
        raise MissingDataError(
            f"{name} is not prepared in {root} (looked for {builder.data_dir}) and its "
            f"download server does not answer ({probe}). On a machine with internet run\n"
            f'    python -c "import tensorflow_datasets as tfds; '
            f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"\n"
            f"(or: tfds build {name} --data_dir=DIR), then copy DIR/{name} into {root} here, "
            "or point --config.data.data_dir (or TFDS_DATA_DIR) at the copied DIR."
        )
    log.info("Downloading and preparing %s into %s.", name, builder.data_dir_root)
    builder.download_and_prepare()
    return builder


def _reachable(url: str) -> bool:
    """Whether a GET of ``url`` gets a successful answer within ``_NETWORK_TIMEOUT_S``.

    A real HTTPS request with certificate checks, through the environment's proxy settings as
    TFDS's downloads: an open TCP port alone proves nothing behind an intercepting proxy. Only
    the status is read, not the body. Runs in a daemon thread so that a slow DNS lookup (which
    ignores timeouts) cannot stall the caller either.
    """
    result = []

    def ask():
        try:
            with urllib.request.urlopen(url, timeout=_NETWORK_TIMEOUT_S) as response:
                result.append(response.status < 400)
        except (OSError, ValueError):  # URLError and HTTPError are OSErrors
            result.append(False)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(_NETWORK_TIMEOUT_S)
    return bool(result and result[0])


def _check_size(name: str, split: str, size: int) -> None:
    expected = SPLITS[name].sizes.get(split) if name in SPLITS else None
    if expected is not None and size != expected:
        log.warning(
            "%s: split %r has %d examples, the reference's has %d: results are "
            "not comparable to the paper's.",
            name,
            split,
            size,
            expected,
        )


# --------------------------------------------------------------------------- image folders


def _imagenet100(name: str, splits: Sequence[str], data_dir: str | None):
    """(paths, labels, 100, skipped) of the ImageNet-100 ``splits`` (module doc: layout)."""
    base = os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
    )
    candidates = [base, os.path.join(base, "imagenet100"), os.path.join(base, "imagenet-100")]
    root = next((c for c in candidates if os.path.isdir(os.path.join(c, splits[0]))), None)
    if root is None:
        raise MissingDataError(
            f"{name}: no {splits[0]}/ folder in {' or '.join(candidates)}. Point "
            "--config.data.data_dir at the folder holding train/<wnid>/ and val/<wnid>/; "
            "the docstring of scott_jax/data/sources.py has a recipe that makes it from the "
            "ILSVRC2012 archives."
        )
    paths, labels, ignored = [], [], collections.Counter()
    for split in splits:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise MissingDataError(f"{name}: no {split}/ folder in {root}")
        folders, _, _ = _scan(split_dir)
        missing = sorted(set(IMAGENET100_WNIDS) - set(folders))
        if missing:
            raise MissingDataError(
                f"{name}: {len(missing)} of the 100 class folders are missing in {split_dir}: "
                f"{_some(missing)}"
            )
        if len(folders) > len(IMAGENET100_WNIDS):
            log.info(
                "%s: ignoring %d folders in %s that are not ImageNet-100 classes.",
                name,
                len(folders) - len(IMAGENET100_WNIDS),
                split_dir,
            )
        count = len(paths)
        for label, wnid in enumerate(IMAGENET100_WNIDS):
            _, files, other = _scan(os.path.join(split_dir, wnid))
            paths += files
            labels += [label] * len(files)
            ignored += other
        _check_size(name, split, len(paths) - count)
    _log_ignored(name, ignored)
    paths, labels, skipped = _drop_undecodable(name, root, paths, labels)
    return paths, labels, len(IMAGENET100_WNIDS), skipped


def _folder(root: str, purpose: str, pretrain_split: str):
    """(paths, labels, num_classes, skipped) of ``purpose`` in the tree ``root/<split>/...``."""
    name = FOLDER_PREFIX + root
    if not storage.is_dir(root):
        raise MissingDataError(f"{name}: no such folder")
    split_names, loose, _ = _scan(root)
    if not split_names:
        raise MissingDataError(
            f"{name}: no split folders; expected {root}/<split>/<class>/*.jpg (or "
            f"{root}/<split>/*.jpg, unlabeled, for pretraining); {len(loose)} images lie "
            "directly in it"
        )
    scans = {split: _scan(os.path.join(root, split)) for split in split_names}
    classes = sorted({c for folders, _, _ in scans.values() for c in folders})
    if purpose != "pretrain" and len(classes) < 2:
        raise DataError(
            f"{name}: purpose {purpose!r} needs labels: at least 2 class folders "
            f"({root}/<split>/<class>/*), found {len(classes)}; an unlabeled or single-class "
            "tree is for pretraining only"
        )
    splits = _folder_splits(name, split_names, purpose, pretrain_split)
    paths, labels, ignored = [], [], collections.Counter()
    for split in splits:
        folders, files, other = scans[split]
        ignored += other
        count = len(paths)
        if not classes:
            paths += files
            labels += [-1] * len(files)
        elif files:
            log.warning(
                "%s: ignoring %d images directly in %s/ (not in a class folder).",
                name,
                len(files),
                split,
            )
        for folder in folders:
            _, class_files, other = _scan(os.path.join(root, split, folder))
            paths += class_files
            labels += [classes.index(folder)] * len(class_files)
            ignored += other
        if len(paths) == count:
            log.warning("%s: split %r has no %s images.", name, split, "/".join(IMAGE_EXTENSIONS))
        elif classes:
            absent = sorted(set(classes) - {classes[i] for i in labels[count:]})
            if absent:
                log.warning(
                    "%s: split %r has no images of %d classes: %s",
                    name,
                    split,
                    len(absent),
                    _some(absent),
                )
    _log_ignored(name, ignored)
    if not paths:
        raise DataError(
            f"{name}: split {'+'.join(splits)} (purpose {purpose!r}) has no "
            f"{'/'.join(IMAGE_EXTENSIONS)} images"
        )
    paths, labels, skipped = _drop_undecodable(name, root, paths, labels)
    return paths, labels, len(classes), skipped


def _folder_splits(
    name: str, available: Sequence[str], purpose: str, pretrain_split: str
) -> tuple[str, ...]:
    """The split folders ``purpose`` reads, given the ``available`` ones (module doc)."""
    if purpose == "pretrain":
        if pretrain_split == "full":
            return tuple(available)
        wanted = tuple(pretrain_split.split("+"))
    elif purpose == "test":
        wanted = next(((s,) for s in FOLDER_TEST_SPLITS if s in available), FOLDER_TEST_SPLITS)
    else:
        wanted = (FOLDER_PROBE_SPLIT,)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise MissingDataError(
            f"{name}: purpose {purpose!r} reads split folder "
            f"{' or '.join(missing) if purpose == 'test' else '+'.join(missing)}, which is "
            f"not there; found: {', '.join(available)}"
        )
    return wanted


def _scan(directory: str) -> tuple[list[str], list[str], collections.Counter]:
    """(sorted sub-folder names, sorted image file paths, other files by extension).

    Not recursive. Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) are skipped.
    """
    subfolders, files = storage.list_dir(directory)
    images, other = [], collections.Counter()
    folders = [name for name in subfolders if not name.startswith(".")]
    for name in files:
        if name.startswith("."):
            continue
        extension = os.path.splitext(name)[1].lower()
        if extension in IMAGE_EXTENSIONS:
            images.append(os.path.join(directory, name))  # a string join: URIs too
        else:
            other[extension or "(none)"] += 1
    return sorted(folders), sorted(images), other


def _log_ignored(name: str, ignored: collections.Counter) -> None:
    """One info line for all non-image files of a source."""
    if ignored:
        log.info(
            "%s: ignoring %d files that are not %s images (by extension: %s).",
            name,
            sum(ignored.values()),
            "/".join(IMAGE_EXTENSIONS),
            ", ".join(f"{ext} {n}" for ext, n in sorted(ignored.items())),
        )


def _drop_undecodable(name: str, root: str, paths: list[str], labels: list[int]):
    """(paths str [n], labels int32 [n], skipped) without the files that fail to decode."""
    paths = np.asarray(paths, dtype=str)
    labels = np.asarray(labels, dtype=np.int32)
    ok = _check_images(root, paths)
    skipped = tuple(paths[~ok].tolist())
    if skipped:
        log.warning(
            "%s: skipping %d files that cannot be read as images: %s",
            name,
            len(skipped),
            _some(skipped),
        )
    return paths[ok], labels[ok], skipped


def _check_images(root: str, paths: np.ndarray) -> np.ndarray:
    """bool [N]: whether each file reads and decodes, decoding only what the cache lacks.

    The cache maps each file's path relative to ``root`` to (size, mtime_ns, ok); an entry is
    reused while the file's size and mtime are unchanged. Every process of a multi-host run
    checks its files; with a shared data folder they share the cache (written atomically).
    """
    cache_path = _check_cache_path(root)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except FileNotFoundError:
        cache = {}
    except (OSError, ValueError) as error:
        log.warning("Ignoring the unreadable image check cache %s: %s", cache_path, error)
        cache = {}
    ok = np.zeros(paths.shape, bool)
    todo = {}  # index -> (key, stamp) of the files to decode
    prefix = len(os.path.join(root, ""))  # the paths were listed under root
    for i, path in enumerate(paths.tolist()):
        try:
            stamp = list(storage.size_and_mtime_ns(path))
        except OSError:
            continue  # a broken link: not ok
        key = path[prefix:]
        entry = cache.get(key)
        if entry is not None and entry[:2] == stamp:
            ok[i] = entry[2]
        else:
            todo[i] = key, stamp
    if todo:
        log.info("Checking that %d image files decode (once; cached in %s).", len(todo), cache_path)
        index = np.fromiter(todo, int, len(todo))
        ok[index] = _decodes(paths[index])
        for i, (key, stamp) in todo.items():
            cache[key] = [*stamp, bool(ok[i])]
        _write_json(cache_path, cache)
    return ok


def _decodes(paths: np.ndarray) -> np.ndarray:
    """bool [N]: whether each file reads and decodes; one parallel tf.data pass."""
    ds = tf.data.Dataset.from_tensor_slices((np.arange(paths.size), paths))
    ds = ds.map(
        lambda i, path: (i, tf.shape(decode_image(tf.io.read_file(path)))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    ok = np.zeros(paths.shape, bool)
    for index, _ in ds.ignore_errors().batch(1024).as_numpy_iterator():
        ok[index] = True
    return ok


def _check_cache_path(root: str) -> str:
    """Beside the data when that folder is local and writable, else under
    ``~/.cache/scott_jax`` (a bucket may be read-only, and each write a billed request)."""
    local = storage.is_local(root)
    if local and os.access(root, os.W_OK):
        return os.path.join(root, _CHECK_CACHE_NAME)
    cache_home = os.environ.get("XDG_CACHE_HOME", os.path.expanduser(os.path.join("~", ".cache")))
    digest = hashlib.sha256((os.path.realpath(root) if local else root).encode()).hexdigest()[:16]
    return os.path.join(cache_home, "scott_jax", f"image_check_{digest}.json")


def _write_json(path: str, value) -> None:
    """Atomic write (unique temp file + rename): concurrent processes never read half a file."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".scott_jax_", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except OSError as error:
        log.warning(
            "Could not save the image check cache %s (%s): the next run re-checks.", path, error
        )


def _some(names: Sequence[str]) -> str:
    """The first ``_LIST_AT_MOST`` names, then how many more."""
    shown = ", ".join(names[:_LIST_AT_MOST])
    more = len(names) - _LIST_AT_MOST
    return shown + (f" ... and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- split draws


def _stratified_split(
    labels: np.ndarray, index: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``index`` into (kept, held out), holding out round(fraction * n_c) of each class c.

    Both parts are sorted; the draw depends only on (labels, index, fraction, seed).
    """
    rng = np.random.default_rng(seed)
    held = [np.zeros(0, index.dtype)]
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
        raise DataError(
            f"labels_per_class must be in [1, {present.min()}] (the smallest class of the "
            f"probe_train split), got {per_class}"
        )
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(index[labels[index] == c])[:per_class] for c in np.flatnonzero(counts)
    ]
    return np.sort(np.concatenate(chosen))
