"""Where a run's files live: a local folder or Google Cloud Storage (`gs://bucket/path`).

Every file scott_jax reads or writes by path (the workdir's config.json, metrics.jsonl and
checkpoints, probe results, exported weights, `folder:` datasets) goes through this module,
which hands the path to `etils.epath`: local paths to `os`, cloud URIs to `tf.io.gfile` (or
fsspec). Never `os`, `open` or `pathlib` on a URI: `pathlib.Path('gs://b/run')` is the local
folder `gs:/b/run`, and a TPU VM's disk, where that would silently land, vanishes with the VM.
TensorFlow (TensorBoard events, image files read by tf.data) and orbax (checkpoints, through
tensorstore) open cloud paths themselves.

Cloud objects cannot be appended to or renamed atomically, so: `write_text` writes a local
file through a temporary file and `os.replace` (readers never see half a file) and a cloud
object in one upload (an object appears whole when its upload ends); metrics.jsonl is
rewritten whole on cloud storage (scott_jax.writers); the workdir lock is local only.
"""

import importlib.util
import os
import re
import uuid

from etils import epath

from scott_jax.errors import ConfigError

#: The URI schemes every library on the path serves: etils.epath (scott_jax's own files),
#: TensorFlow (TensorBoard events, tf.data's image reads) and orbax / tensorstore
#: (checkpoints). s3:// and az:// are not: TensorFlow no longer reads them.
CLOUD_SCHEMES = ("gs",)

#: The client library orbax needs for a scheme (it lists a bucket's checkpoints through it),
#: and the extra that installs it.
CLIENTS = {"gs": ("google.cloud.storage", "gcs")}

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(location: str | os.PathLike) -> str | None:
    """'gs' for 'gs://bucket/run', None for a local path."""
    match = _URI.match(os.fspath(location))
    return match.group(1) if match else None


def is_local(location: str | os.PathLike) -> bool:
    return scheme(location) is None


def problem(location: str | os.PathLike, what: str) -> str | None:
    """What is wrong with a URI whose scheme no backend serves (it would become a local folder
    named after the scheme) or that names no bucket; None for a usable location. `what` names
    the setting in the message."""
    name = scheme(location)
    if name is None:
        return None
    if name not in CLOUD_SCHEMES:
        return (
            f"{what} {os.fspath(location)!r}: unsupported storage scheme {name}://; use a local "
            f"path or one of {', '.join(s + '://' for s in CLOUD_SCHEMES)}"
        )
    if not os.fspath(location)[len(name) + 3 :].split("/")[0]:
        return f"{what} {os.fspath(location)!r} names no bucket"
    module, extra = CLIENTS[name]
    if not _importable(module):
        return (
            f"{what} {os.fspath(location)!r} needs the {module} package: "
            f"pip install 'scott_jax[{extra}]'"
        )
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check(location: str | os.PathLike, what: str) -> None:
    """ConfigError with `problem`'s message, if any."""
    if message := problem(location, what):
        raise ConfigError(message)


def resolve(location: str | os.PathLike) -> str:
    """An absolute local path (with ~ expanded), or the URI without a trailing slash."""
    location = os.fspath(location)
    if is_local(location):
        return os.path.abspath(os.path.expanduser(location))
    return location.rstrip("/")


def path(location: str | os.PathLike) -> epath.Path:
    """`resolve(location)` as an `epath.Path` (a pathlib-like path that serves URIs)."""
    return epath.Path(resolve(location))


def join(location: str | os.PathLike, *parts: str) -> str:
    return os.fspath(path(location).joinpath(*parts))


def exists(location: str | os.PathLike) -> bool:
    return path(location).exists()


def is_dir(location: str | os.PathLike) -> bool:
    return path(location).is_dir()


def makedirs(location: str | os.PathLike) -> None:
    path(location).mkdir(parents=True, exist_ok=True)


def remove(location: str | os.PathLike) -> None:
    """Deletes a file; no error if it is not there."""
    path(location).unlink(missing_ok=True)


def read_text(location: str | os.PathLike) -> str:
    return path(location).read_text()


def read_bytes(location: str | os.PathLike) -> bytes:
    return path(location).read_bytes()


def write_text(location: str | os.PathLike, text: str) -> None:
    """Writes the file whole: readers see the old content or the new, never a part."""
    write_bytes(location, text.encode())


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """`write_text` for bytes."""
    target = path(location)
    if not is_local(location):
        target.write_bytes(data)  # one upload: the object appears whole when it ends
        return
    # A unique name, so concurrent writers never mix; `open` (not mkstemp's 0600) keeps the
    # permissions the user's umask gives.
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "xb") as f:
        f.write(data)
    os.replace(tmp, target)


def size_and_mtime_ns(location: str | os.PathLike) -> tuple[int, int]:
    """(bytes, modification time in ns); OSError if the file cannot be read now."""
    if is_local(location):
        stat = os.stat(location)
        return stat.st_size, stat.st_mtime_ns
    stat = path(location).stat()
    return int(stat.length), int(stat.mtime * 1_000_000_000)


def list_dir(location: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of a folder, unsorted. Entries that cannot be read (a
    symlink loop, a dangling link) count as files, whose reads then fail."""
    if is_local(location):
        folders, files = [], []
        with os.scandir(location) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                (folders if is_dir else files).append(entry.name)
        return folders, files
    folders, files = [], []
    for child in path(location).iterdir():
        (folders if child.is_dir() else files).append(child.name)
    return folders, files
