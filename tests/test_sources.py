"""Sources beyond digits: split tables, TFDS (mock_data), image folders, ImageNet-100, bad files.

All offline and fast: TFDS builders run under ``tfds.testing.mock_data`` (random 5-49 px PNG
noise, split names unchecked, so the split arithmetic is also tested directly), image trees are
generated into tmp_path.
"""

import logging
import os
import socket
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from scott_jax.data import (
    IMAGENET100_WNIDS,
    PURPOSES,
    SOURCES,
    SPLITS,
    decode_image,
    eval_batches,
    load_source,
    pretrain_batches,
    purpose_splits,
    sources,
)

# ---------------------------------------------------------------------------
# Helpers


def write_image(path, shape=(12, 10, 3), seed=0, fmt=None):
    """Writes random pixels of ``shape`` [H, W, C] (C = 1 gray, 3 RGB, 4 RGBA) as PNG or JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    fmt = fmt or ("jpeg" if str(path).lower().endswith((".jpg", ".jpeg")) else "png")
    data = tf.io.encode_jpeg(pixels) if fmt == "jpeg" else tf.io.encode_png(pixels)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.numpy())


def write_bytes(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture
def tree(tmp_path):
    """A labeled tree with every kind of file a real folder holds.

    train: cat 5 (two RGB PNGs, a grayscale PNG, an RGBA PNG, an upper-case .JPG), dog 4 + a
    corrupt .jpg + a truncated .jpeg, fish 2, and notes.txt, .DS_Store, a loose image; test: cat
    2, dog 2 (no fish folder). 15 images decode, 2 do not.
    """
    root = tmp_path / "tree"
    n = 0
    layout = {"train": {"cat": 2, "dog": 4, "fish": 2}, "test": {"cat": 2, "dog": 2}}
    for split, counts in layout.items():
        for cls, count in counts.items():
            for i in range(count):
                n += 1
                write_image(root / split / cls / f"{i}.png", (10 + n, 8 + 2 * n, 3), seed=n)
    write_image(root / "train/cat/gray.png", (9, 11, 1))
    write_image(root / "train/cat/rgba.png", (13, 7, 4))
    write_image(root / "train/cat/UPPER.JPG", (16, 12, 3))
    jpeg = tf.io.encode_jpeg(np.zeros((40, 40, 3), np.uint8) + 90).numpy()
    write_bytes(root / "train/dog/corrupt.jpg", np.random.default_rng(0).bytes(300))
    write_bytes(root / "train/dog/truncated.jpeg", jpeg[: len(jpeg) // 2])
    write_bytes(root / "train/cat/notes.txt", b"not an image")
    write_bytes(root / "train/dog/.DS_Store", b"\0\0\0\1Bud1")
    write_image(root / "train/loose.png")
    return root


# ---------------------------------------------------------------------------
# Split arithmetic (pure: mock_data does not check split names)

REFERENCE_SIZES = {  # docs/design.md#data-splits: (name, purpose, pretrain_split) -> examples
    ("oxford_flowers102", "pretrain", "full"): 8189,
    ("oxford_flowers102", "pretrain", "trainval"): 2040,
    ("oxford_flowers102", "pretrain", "train"): 1020,
    ("oxford_flowers102", "probe_train", "full"): 2040,
    ("oxford_flowers102", "test", "full"): 6149,
    ("oxford_iiit_pet", "pretrain", "full"): 7349,
    ("oxford_iiit_pet", "pretrain", "train"): 3680,
    ("oxford_iiit_pet", "probe_train", "full"): 3680,
    ("oxford_iiit_pet", "test", "full"): 3669,
    ("imagenet100", "pretrain", "full"): 135_000,
    ("imagenet100", "pretrain", "train"): 130_000,
    ("imagenet100", "probe_select", "full"): 130_000,
    ("imagenet100", "test", "full"): 5_000,
    ("digits", "pretrain", "full"): 1797,
}


@pytest.mark.parametrize("key", REFERENCE_SIZES, ids="/".join)
def test_split_table_matches_the_reference_sizes(key):
    """probe_* sizes here are before the probe_select hold-out."""
    name, purpose, pretrain_split = key
    splits = purpose_splits(name, purpose, pretrain_split)
    assert sum(SPLITS[name].sizes[s] for s in splits) == REFERENCE_SIZES[key]


def test_split_table_names():
    assert purpose_splits("oxford_flowers102", "pretrain") == ("train", "validation", "test")
    assert purpose_splits("oxford_flowers102", "probe_select") == ("train", "validation")
    assert purpose_splits("oxford_iiit_pet", "pretrain") == ("train", "test")
    assert purpose_splits("imagenet100", "test") == ("val",)
    for name in SOURCES:  # test images never reach a probe
        assert not set(SPLITS[name].probe) & set(SPLITS[name].test)
        assert "full" in SPLITS[name].pretrain
    with pytest.raises(ValueError, match="unknown pretrain_split 'trainval'; known: full, train"):
        purpose_splits("oxford_iiit_pet", "pretrain", "trainval")


def test_probe_select_hold_out_sizes():
    """Flowers' probe data is 20 per class: 10 % per class holds out 2 x 102 = 204."""
    labels = np.repeat(np.arange(102, dtype=np.int32), 20)
    train, select = sources._stratified_split(labels, np.arange(labels.size), 0.1, 0)
    assert (train.size, select.size) == (1836, 204)
    np.testing.assert_array_equal(np.bincount(labels[select]), np.full(102, 2))
    np.testing.assert_array_equal(np.union1d(train, select), np.arange(labels.size))


def test_imagenet100_wnids():
    """The reference's 100 animal wnids (`imagenet100.py`), sorted (index = position)."""
    assert len(set(IMAGENET100_WNIDS)) == 100
    assert list(IMAGENET100_WNIDS) == sorted(IMAGENET100_WNIDS)
    assert IMAGENET100_WNIDS[0] == "n01440764" and IMAGENET100_WNIDS[-1] == "n02077923"
    assert "n02869837" not in IMAGENET100_WNIDS  # CMC's first class (bonnet) is not in it


def test_digits_pretrain_split_variants():
    assert load_source("digits", "pretrain", pretrain_split="train").num_examples == 1258
    with pytest.raises(ValueError, match="unknown pretrain_split"):
        load_source("digits", "pretrain", pretrain_split="trainval")


def test_unknown_name_lists_sources_and_the_folder_form():
    with pytest.raises(ValueError, match=r"oxford_flowers102.*imagenet100.*'folder:<path>'"):
        load_source("flowers", "pretrain")


def test_source_storages_and_labels():
    labels = np.zeros(2, np.int32)
    pixels = sources.Source("x", "test", np.zeros((2, 4, 4, 3), np.uint8), labels, 1)
    encoded = sources.Source("x", "test", np.array([b"a", b"b"], object), labels, 1)
    files = sources.Source("x", "test", np.array(["a.png", "b.png"]), labels, 1)
    assert [s.storage for s in (pixels, encoded, files)] == ["pixels", "encoded", "files"]
    with pytest.raises(ValueError, match=r"object \[N\] of bytes or str \[N\] of paths"):
        sources.Source("x", "test", np.array([b"a", "b"], object), labels, 1)
    unlabeled = sources.Source("x", "pretrain", files.images, np.full(2, -1, np.int32), 0)
    assert unlabeled.num_classes == 0
    with pytest.raises(ValueError, match="needs labels -1"):
        sources.Source("x", "pretrain", files.images, labels, 0)


# ---------------------------------------------------------------------------
# TFDS sources (mock_data)


@pytest.fixture
def offline_ok(monkeypatch):
    """Under mock_data a builder is never "prepared" and download_and_prepare is a no-op: fake
    a reachable host so that loading goes on to the mocked reader (offline path: below)."""
    monkeypatch.setattr(sources, "_reachable", lambda host: True)


def test_tfds_source_under_mock_data(offline_ok):
    """TFDS's own random examples (9 per split read): SkipDecoding keeps encoded bytes.

    Flowers only: TFDS's random Pets examples fail in the mock itself (a random head_bbox with
    min > max); Pets runs under the controlled mock below.
    """
    name, num_classes = "oxford_flowers102", 102
    with tfds.testing.mock_data(num_examples=9):
        pretrain = load_source(name, "pretrain")
        test = load_source(name, "test")
        again = load_source(name, "pretrain")
    assert (pretrain.num_examples, test.num_examples) == (27, 9)  # train+validation+test; test
    for source in (pretrain, test):
        assert source.storage == "encoded" and source.num_classes == num_classes
        assert source.labels.dtype == np.int32 and source.skipped_files == ()
        assert 0 <= source.labels.min() and source.labels.max() < num_classes
    # The mock's images are PNGs of 5-49 px noise; they decode to RGB.
    assert all(image.startswith(b"\x89PNG") for image in test.images)
    pixels = decode_image(test.images[0]).numpy()
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3 and 5 <= pixels.shape[0] < 50
    # Loading is deterministic (same order, same bytes): every host agrees on index i.
    assert list(again.images) == list(pretrain.images)
    batch = next(pretrain_batches(pretrain, batch_size=8, img_size=16, seed=0))
    assert batch["context"].shape == (8, 16, 16, 3) and np.isfinite(batch["context"]).all()
    batches = list(eval_batches(test, batch_size=4, img_size=16))
    mask = np.concatenate([b["mask"] for b in batches])
    assert len(batches) == 3 and mask.sum() == 9
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], test.labels)


@pytest.fixture
def balanced_tfds(offline_ok):
    """mock_data whose every split holds 6 examples of each class (tiny PNGs, labels cycling),
    so the per-class hold-out has something to hold out; records the splits read."""
    asked = []

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        asked.append(str(split))
        num_classes = self.info.features["label"].num_classes
        n = 6 * num_classes
        return tf.data.Dataset.from_tensor_slices(
            {
                "file_name": [f"{split}_{i:05d}.jpg" for i in range(n)],
                "image": [PNGS[i % len(PNGS)] for i in range(n)],
                "label": np.arange(n) % num_classes,
            }
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        yield asked


PNGS = [tf.io.encode_png(np.full((6, 5, 3), v, np.uint8)).numpy() for v in range(7)]


@pytest.mark.parametrize("name, num_classes", [("oxford_flowers102", 102), ("oxford_iiit_pet", 37)])
def test_tfds_purposes_read_their_splits(balanced_tfds, name, num_classes):
    loaded = {purpose: load_source(name, purpose) for purpose in PURPOSES}
    expected = [s for p in PURPOSES for s in purpose_splits(name, p)]
    assert balanced_tfds == expected
    per_split = 6 * num_classes
    sizes = {purpose: source.num_examples for purpose, source in loaded.items()}
    probe_splits = len(SPLITS[name].probe)
    # 10 % of each class of the probes' data: 6 -> 1 (pets), 12 -> 1 (flowers).
    assert sizes == {
        "pretrain": per_split * len(purpose_splits(name, "pretrain")),
        "probe_train": (6 * probe_splits - 1) * num_classes,
        "probe_select": num_classes,
        "test": per_split,
    }
    np.testing.assert_array_equal(np.bincount(loaded["probe_select"].labels), np.ones(num_classes))
    few = load_source(name, "probe_train", labels_per_class=2)
    np.testing.assert_array_equal(np.bincount(few.labels), np.full(num_classes, 2))


def test_tfds_flowers_pretrain_variants(balanced_tfds):
    counts = {
        variant: load_source("oxford_flowers102", "pretrain", pretrain_split=variant).num_examples
        for variant in ("full", "trainval", "train")
    }
    assert counts == {"full": 3 * 612, "trainval": 2 * 612, "train": 612}
    assert balanced_tfds == ["train", "validation", "test", "train", "validation", "train"]


def test_tfds_absent_and_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    """The real server check, against a host that cannot resolve: no download, no stall."""
    url = "https://scott-jax-test.invalid/setid.mat"
    monkeypatch.setitem(sources._DOWNLOAD_PROBES, "oxford_flowers102", url)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        load_source("oxford_flowers102", "pretrain", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "oxford_flowers102 is not prepared in " + str(tmp_path) in message
    assert "download_and_prepare()" in message and "tfds build oxford_flowers102" in message
    assert "--config.data.data_dir" in message


def test_server_check_is_bounded():
    """A server that accepts the connection and then never answers is given up after ~3 s."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        start = time.monotonic()
        assert not sources._reachable(f"https://127.0.0.1:{silent.getsockname()[1]}/x")
        assert time.monotonic() - start < sources._NETWORK_TIMEOUT_S + 1


# ---------------------------------------------------------------------------
# folder:<path>


def test_folder_source_splits_labels_and_bad_files(tree, caplog):
    name = f"folder:{tree}"
    with caplog.at_level(logging.INFO, logger=sources.__name__):
        pretrain = load_source(name, "pretrain")
    assert pretrain.storage == "files" and pretrain.num_classes == 3  # cat, dog, fish
    assert pretrain.num_examples == 15
    assert sorted(os.path.basename(f) for f in pretrain.skipped_files) == [
        "corrupt.jpg",
        "truncated.jpeg",
    ]
    log_text = caplog.text
    assert "skipping 2 files that cannot be read as images" in log_text
    assert "corrupt.jpg" in log_text and "truncated.jpeg" in log_text
    assert "ignoring 1 files that are not .jpg/.jpeg/.png images (by extension: .txt 1)" in (
        log_text
    )
    assert "ignoring 1 images directly in train/" in log_text
    assert "split 'test' has no images of 1 classes: fish" in log_text
    # Class index = position of the folder name in the sorted union over splits.
    names = {os.path.basename(os.path.dirname(p)) for p in pretrain.images}
    assert names == {"cat", "dog", "fish"}
    for path, label in zip(pretrain.images, pretrain.labels, strict=True):
        assert ["cat", "dog", "fish"][label] == os.path.basename(os.path.dirname(path))
    # The probes read train (minus nothing: 10 % of <= 5 rounds to 0), test reads test.
    probe_train = load_source(name, "probe_train")
    test = load_source(name, "test")
    assert probe_train.num_examples == 11 and test.num_examples == 4
    assert all("/test/" in p for p in test.images) and probe_train.skipped_files
    assert set(probe_train.images) | set(test.images) == set(pretrain.images)
    # Grayscale and RGBA decode to 3 channels.
    gray = next(p for p in pretrain.images if p.endswith("gray.png"))
    rgba = next(p for p in pretrain.images if p.endswith("rgba.png"))
    assert decode_image(tf.io.read_file(gray)).shape == (9, 11, 3)
    assert decode_image(tf.io.read_file(rgba)).shape == (13, 7, 3)


def test_folder_conventions_match_tfds_image_folder(tree):
    """Same splits, class names and per-split file counts as tfds.folder_dataset.ImageFolder."""
    builder = tfds.folder_dataset.ImageFolder(str(tree))
    assert builder.info.features["label"].names == ["cat", "dog", "fish"]
    for split, info in builder.info.splits.items():
        ours = load_source(f"folder:{tree}", "pretrain", pretrain_split=split)
        assert ours.num_examples + len(ours.skipped_files) == info.num_examples


def test_folder_probe_select_and_labels_per_class(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            write_image(tmp_path / "train" / cls / f"{i}.png", seed=i)
        write_image(tmp_path / "val" / cls / "0.png")
    name = f"folder:{tmp_path}"
    train, select = (load_source(name, p) for p in ("probe_train", "probe_select"))
    np.testing.assert_array_equal(np.bincount(select.labels), [1, 1])  # 10 % of each class
    assert train.num_examples == 18 and not set(train.images) & set(select.images)
    assert load_source(name, "test").num_examples == 2  # no test/: val/ is the test split
    few = load_source(name, "probe_train", labels_per_class=3)
    np.testing.assert_array_equal(np.bincount(few.labels), [3, 3])
    assert set(few.images) <= set(train.images)


def test_folder_check_is_cached_and_follows_changes(tree, monkeypatch):
    name = f"folder:{tree}"
    first = load_source(name, "pretrain")
    assert os.path.exists(tree / sources._CHECK_CACHE_NAME)

    def no_decoding(paths):
        raise AssertionError(f"re-decoded {list(paths)}")

    monkeypatch.setattr(sources, "_decodes", no_decoding)
    again = load_source(name, "pretrain")
    np.testing.assert_array_equal(again.images, first.images)
    assert again.skipped_files == first.skipped_files
    # A file that changes (size, mtime) is checked again, and only that one.
    monkeypatch.undo()
    write_bytes(tree / "train/fish/0.png", b"broken now")
    checked = []
    decodes = sources._decodes
    monkeypatch.setattr(sources, "_decodes", lambda paths: checked.extend(paths) or decodes(paths))
    after = load_source(name, "pretrain")
    assert [os.path.basename(p) for p in checked] == ["0.png"]
    assert after.num_examples == 14 and len(after.skipped_files) == 3


def test_folder_check_cache_goes_home_when_the_data_is_read_only(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(sources.os, "access", lambda path, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    load_source(f"folder:{tree}", "test")
    assert not os.path.exists(tree / sources._CHECK_CACHE_NAME)
    (cache_file,) = os.listdir(tmp_path / "cache" / "scott_jax")
    assert cache_file.startswith("image_check_") and cache_file.endswith(".json")


def test_folder_unlabeled_and_single_class_trees_pretrain_only(tmp_path):
    for split, count in {"train": 3, "extra": 2}.items():
        for i in range(count):
            write_image(tmp_path / "unlabeled" / split / f"{i}.jpg", seed=i)
    unlabeled = load_source(f"folder:{tmp_path / 'unlabeled'}", "pretrain")
    assert (unlabeled.num_examples, unlabeled.num_classes) == (5, 0)
    assert np.all(unlabeled.labels == -1)
    batch = next(pretrain_batches(unlabeled, batch_size=4, img_size=8, seed=0))
    assert batch["context"].shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match="'probe_train' needs labels: at least 2 class folders"):
        load_source(f"folder:{tmp_path / 'unlabeled'}", "probe_train")
    write_image(tmp_path / "one" / "train" / "only" / "0.png")
    assert load_source(f"folder:{tmp_path / 'one'}", "pretrain").num_classes == 1
    with pytest.raises(ValueError, match=r"'test' needs labels: .* found 1"):
        load_source(f"folder:{tmp_path / 'one'}", "test")


def test_folder_empty_or_missing_splits_are_reported(tmp_path, caplog):
    for cls in ("a", "b"):
        write_image(tmp_path / "train" / cls / "0.png")
        os.makedirs(tmp_path / "test" / cls)  # class folders, no images
    name = f"folder:{tmp_path}"
    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        assert load_source(name, "pretrain").num_examples == 2
    assert "split 'test' has no .jpg/.jpeg/.png images" in caplog.text
    with pytest.raises(ValueError, match=r"split test \(purpose 'test'\) has no"):
        load_source(name, "test")
    with pytest.raises(FileNotFoundError, match=r"reads split folder bogus.*found: test, train"):
        load_source(name, "pretrain", pretrain_split="train+bogus")
    os.rename(tmp_path / "test", tmp_path / "holdout")
    with pytest.raises(FileNotFoundError, match="test or val or validation, which is not there"):
        load_source(name, "test")
    with pytest.raises(FileNotFoundError, match="no split folders"):
        load_source(f"folder:{tmp_path / 'train' / 'a'}", "pretrain")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_source(f"folder:{tmp_path / 'nowhere'}", "pretrain")


STREAM = dict(batch_size=4, img_size=16, seed=5)  # 15 images: 3 steps per epoch


def test_folder_pretrain_stream_is_deterministic_and_resumes(tree):
    source = load_source(f"folder:{tree}", "pretrain")
    run = take(pretrain_batches(source, **STREAM), 5)
    assert run[0]["context"].shape == (4, 16, 16, 3) and run[0]["label"].shape == (4,)
    assert_same_batches(take(pretrain_batches(source, **STREAM), 5), run)
    assert_same_batches(take(pretrain_batches(source, start_step=4, **STREAM), 1), run[4:])
    halves = [
        next(pretrain_batches(source, start_step=2, process_index=p, process_count=2, **STREAM))
        for p in range(2)
    ]
    joined = {k: np.concatenate([halves[0][k], halves[1][k]]) for k in halves[0]}
    assert_same_batches([joined], run[2:3])


@pytest.mark.parametrize("process_count", [1, 2])
def test_folder_eval_covers_every_example_once(tree, process_count):
    source = load_source(f"folder:{tree}", "pretrain")
    hosts = [
        list(
            eval_batches(
                source, batch_size=4, img_size=16, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    assert [len(h) for h in hosts] == [4] * process_count  # ceil(15 / 4) on every host
    mask = np.concatenate([b["mask"] for i in range(4) for h in hosts for b in [h[i]]])
    labels = np.concatenate([b["label"] for i in range(4) for h in hosts for b in [h[i]]])
    assert mask.sum() == 15 and not mask[15:].any()
    np.testing.assert_array_equal(labels[mask], source.labels)
    images = np.concatenate([b["image"] for i in range(4) for h in hosts for b in [h[i]]])
    assert images.shape == (16, 16, 16, 3) and np.isfinite(images).all()


# ---------------------------------------------------------------------------
# imagenet100


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    """<base>/imagenet-100/{train,val}/<wnid>/ with 1 image each, mixed-case extensions, plus
    a folder that is not one of the 100 classes."""
    base = tmp_path_factory.mktemp("tfds_data")
    root = base / "imagenet-100"
    extensions = (".JPEG", ".jpg", ".Png")
    for split in ("train", "val"):
        for i, wnid in enumerate(IMAGENET100_WNIDS):
            write_image(root / split / wnid / f"{wnid}_{i}{extensions[i % 3]}", (8, 8, 3), i)
        write_image(root / split / "n09999999" / "other.jpg")
    return base


def test_imagenet100_reads_the_100_wnids(imagenet_tree, monkeypatch, caplog):
    monkeypatch.setenv("TFDS_DATA_DIR", str(imagenet_tree))  # data_dir=None: TFDS's data dir
    with caplog.at_level(logging.INFO, logger=sources.__name__):
        pretrain = load_source("imagenet100", "pretrain")
    assert (pretrain.num_examples, pretrain.num_classes) == (200, 100)
    assert "ignoring 1 folders" in caplog.text and "the reference's has 130000" in caplog.text
    test = load_source("imagenet100", "test", data_dir=str(imagenet_tree / "imagenet-100"))
    np.testing.assert_array_equal(test.labels, np.arange(100))
    for path, label in zip(test.images, test.labels, strict=True):
        assert f"/val/{IMAGENET100_WNIDS[label]}/" in path
    assert load_source("imagenet100", "pretrain", pretrain_split="train").num_examples == 100
    # One image per class: a 10 % hold-out rounds to nothing, which is reported.
    with pytest.raises(ValueError, match="'probe_select' has no examples"):
        load_source("imagenet100", "probe_select")


def test_imagenet100_missing_wnids_are_listed(tmp_path):
    for wnid in IMAGENET100_WNIDS[:3]:
        write_image(tmp_path / "train" / wnid / "0.jpeg")
    with pytest.raises(FileNotFoundError) as error:
        load_source("imagenet100", "probe_train", data_dir=str(tmp_path))
    message = str(error.value)
    assert "97 of the 100 class folders are missing" in message
    assert IMAGENET100_WNIDS[3] in message and "... and 77 more" in message
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        load_source("imagenet100", "test", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# Any TFDS image dataset: tfds:<builder>


def test_tfds_split_defaults_follow_the_builders_splits():
    table = sources.tfds_splits(["train", "validation", "test"], {})
    assert (table.probe, table.test) == (("train", "validation"), ("test",))
    assert table.pretrain["full"] == ("train", "validation", "test")
    assert table.pretrain["train"] == ("train",)
    no_test = sources.tfds_splits(["train", "validation"], {})
    assert (no_test.probe, no_test.test) == (("train",), ("validation",))
    chosen = sources.tfds_splits(["train", "test", "extra"], {"probe": ("train", "extra")})
    assert chosen.probe == ("train", "extra") and chosen.pretrain["full"][-1] == "extra"
    with pytest.raises(ValueError, match="cannot tell the probe and test splits"):
        sources.tfds_splits(["unlabeled"], {})


def test_tfds_names_parse_and_bad_ones_are_clear():
    assert sources.parse_tfds_name("tfds:dtd?probe=train+validation&test=test") == (
        "dtd",
        {"probe": ("train", "validation"), "test": ("test",)},
    )
    with pytest.raises(ValueError, match=r"expected tfds:<builder>"):
        sources.parse_tfds_name("tfds:dtd?pretrain=train")
    with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_dataset'"):
        load_source("tfds:no_such_dataset", "pretrain")


def test_any_tfds_image_dataset_loads_under_mock_data(offline_ok):
    """dtd (Describable Textures, 47 classes) through the generic path, splits named."""
    name = "tfds:dtd?probe=train+validation&test=test"
    with tfds.testing.mock_data(num_examples=6):
        pretrain = load_source(name, "pretrain", pretrain_split="train+validation")
        probe = load_source(name, "probe_train")
        test = load_source(name, "test")
    assert pretrain.storage == "encoded" and pretrain.num_classes == 47
    assert (pretrain.num_examples, test.num_examples) == (12, 6)
    assert probe.num_examples <= 12 and probe.num_classes == 47
