"""A run whose workdir and `folder:` dataset are on cloud storage (gs://) never reaches the
local disk through `os`, `open`, `pathlib` or `shutil`.

The bucket is a fake that works offline: `etils.epath` (through which scott_jax does all
its file work, scott_jax.storage) serves `gs://bucket/...` from a local folder, as
tf.io.gfile would from GCS; orbax's bucket client reports a flat namespace. The two
libraries that open cloud paths themselves get the same translation at their entry points:
TensorFlow (`tf.summary.create_file_writer`, `tf.io.read_file`) and orbax, whose tensorstore
GCS kvstore becomes a file kvstore on that folder (orbax itself still takes its GCS code
paths: no atomic rename, a commit marker file). Every `os` / `open` / `pathlib` / `shutil`
call that is handed a gs:// path is recorded and fails the test, whatever the caller did
with the error.
"""

import builtins
import functools
import json
import os
import pathlib
import shutil
import sys
import types

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from test_loop import tiny_config

from scott_jax import loop, storage
from scott_jax.errors import ConfigError

BUCKET = "gs://bucket"


class FakeBucket(epath_backend._OsPathBackend):
    """epath's backend for gs:// paths, storing `gs://<bucket>/<key>` at `<root>/<bucket>/<key>`."""

    def __init__(self, root: str):
        self.root = root

    def local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith("gs://"), path
        return os.path.join(self.root, path[len("gs://") :])

    def cloud(self, path: str) -> str:
        return "gs://" + os.path.relpath(path, self.root)

    def open(self, path, mode):
        if "r" not in mode:  # an object store has no folders to create first
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self.cloud(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(
            self.local(top), top_down=top_down, on_error=on_error
        ):
            yield self.cloud(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=0o777):
        super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=0o777):
        super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        super().rmtree(self.local(path))

    def remove(self, path):
        super().remove(self.local(path))

    def rename(self, path, dst):
        super().rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        super().replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        super().copy(self.local(path), self.local(dst), overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


def _is_cloud(value) -> bool:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    elif isinstance(value, os.PathLike):
        value = os.fspath(value)
    return isinstance(value, str) and ("gs:/" in value)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The fake bucket (module docstring); yields (local folder of gs://bucket, os calls that
    were handed a gs:// path)."""
    import tensorflow as tf
    from orbax.checkpoint._src.path import gcs_utils

    fake = FakeBucket(str(tmp_path / "gcs"))
    os.makedirs(fake.local(BUCKET))
    original_backend = gpath._GPath._backend
    monkeypatch.setattr(
        gpath._GPath,
        "_backend",
        property(lambda p: fake if p._uri_scheme == "gs" else original_backend.fget(p)),
    )

    def file_kvstore(path, *args, **kwargs):
        return {"driver": "file", "path": fake.local(path)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", file_kvstore)
    # Orbax asks the bucket whether it has a hierarchical namespace (this one is flat).
    monkeypatch.setattr(
        gcs_utils,
        "get_bucket",
        lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False),
    )
    create_file_writer = tf.summary.create_file_writer
    monkeypatch.setattr(
        tf.summary,
        "create_file_writer",
        lambda logdir, *a, **k: create_file_writer(fake.local(logdir), *a, **k),
    )
    read_file = tf.io.read_file
    monkeypatch.setattr(
        tf.io,
        "read_file",
        lambda path, *a, **k: read_file(
            tf.strings.regex_replace(path, "^gs://", fake.root + "/"), *a, **k
        ),
    )

    violations = []

    def guarded(module, name):
        original = getattr(module, name)

        @functools.wraps(original)
        def call(*args, **kwargs):
            if any(_is_cloud(a) for a in args[:2]):
                violations.append(f"{module.__name__}.{name}{args[:2]}")
                raise AssertionError(f"{name} got a cloud path: {args[:2]}")
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, call)

    for name in ("open", "stat", "makedirs", "mkdir", "replace", "rename", "remove", "unlink"):
        guarded(os, name)
    for name in ("scandir", "listdir", "access", "rmdir"):
        guarded(os, name)
    for name in ("exists", "isdir", "isfile", "getsize"):
        guarded(os.path, name)
    guarded(builtins, "open")
    guarded(shutil, "move")
    guarded(shutil, "rmtree")
    guarded(pathlib.Path, "mkdir")
    guarded(pathlib.Path, "open")
    guarded(pathlib.Path, "exists")
    yield fake.local(BUCKET), violations
    assert not violations


def write_images(root: str) -> None:
    """A labeled folder dataset: train/ and test/, two classes of 8x8 RGB images each."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("test", 8)):
        for i in range(count):
            folder = os.path.join(root, split, f"c{i % 2}")
            os.makedirs(folder, exist_ok=True)
            pixels = rng.integers(0, 256, (8, 8, 3), np.uint8) // (1 + i % 2)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


def test_a_run_probe_and_export_on_cloud_storage(bucket, tmp_path, monkeypatch):
    from configs import probe as probe_configs
    from scott_jax import export
    from scott_jax.evaluators.probes import run_probes

    local, violations = bucket
    write_images(os.path.join(local, "images"))
    monkeypatch.chdir(tmp_path)  # a local folder named gs: would appear here
    config = tiny_config(
        **{"data.name": f"folder:{BUCKET}/images/", "batch_size": 8, "keep_checkpoints": 1}
    )
    workdir = f"{BUCKET}/run"
    loop.train_and_evaluate(config, workdir, stop_at_step=2)
    loop.train_and_evaluate(config, workdir, stop_at_step=3)  # resumes from the bucket

    run = os.path.join(local, "run")
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert json.load(open(os.path.join(run, "config.json")))["data"]["name"] == config.data.name
    assert os.listdir(os.path.join(run, "tensorboard"))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["3"]  # step 2 pruned
    # orbax's GCS protocol: written in place, then marked finished (no rename on GCS)
    assert os.path.exists(os.path.join(run, "checkpoints", "3", "commit_success.txt"))
    assert not os.path.exists(os.path.join(run, ".lock"))  # no lock on cloud storage

    probe = probe_configs.get_config()
    probe.num_epochs, probe.probes, probe.augment = 1, ("linear",), False
    results = run_probes(probe, workdir)
    assert results["workdir"] == workdir and results["checkpoint_step"] == 3
    assert json.load(open(os.path.join(run, "probe", "results.json")))["checkpoint_step"] == 3

    export.run(["--workdir", workdir, "--format", "npz"])
    weights = np.load(os.path.join(run, "context-encoder_step3.npz"))  # the default encoder
    assert len(weights.files) > 0

    assert not violations
    assert not [p for p in tmp_path.rglob("gs:*")], "a cloud path became a local folder"


@pytest.mark.parametrize(
    "location, message",
    [
        ("ram://run", "unsupported storage scheme ram://"),
        ("s3://bucket/run", "unsupported storage scheme s3://"),
        ("gs://", "names no bucket"),
        ("gs:///run", "names no bucket"),
    ],
)
def test_an_unusable_cloud_location_is_one_clear_error(location, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        loop.train_and_evaluate(tiny_config(), location)
    with pytest.raises(ConfigError, match=message):
        loop.train_and_evaluate(tiny_config(**{"data.name": f"folder:{location}"}), tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_local_and_cloud_locations_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/a") == str(tmp_path / "runs" / "a")
    assert storage.resolve("gs://b/run/") == "gs://b/run"
    assert storage.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
    assert storage.is_local("/x") and not storage.is_local("s3://b/x")


def test_metrics_reach_a_bucket_at_most_every_flush_interval_and_at_close(bucket, monkeypatch):
    """Each upload rewrites the whole object, so a fast step must not upload at every row."""
    from scott_jax import writers

    local, _ = bucket
    uploads = []
    write_text = storage.write_text
    monkeypatch.setattr(storage, "write_text", lambda *a: uploads.append(a) or write_text(*a))
    writer = writers.MetricWriter(f"{BUCKET}/metrics_run", tensorboard=False)
    for step in range(1, 4):
        writer.write(step, {"loss": 1.0 / step})
    assert uploads == []  # within CLOUD_FLUSH_SECONDS of the start
    monkeypatch.setattr(writers, "CLOUD_FLUSH_SECONDS", 0.0)
    writer.write(4, {"loss": 0.25})
    assert len(uploads) == 1
    writer.write(5, {"loss": 0.2})
    writer.close()
    assert len(uploads) == 2
    rows = writers.read_metrics(f"{BUCKET}/metrics_run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert os.path.exists(os.path.join(local, "metrics_run", "metrics.jsonl"))
