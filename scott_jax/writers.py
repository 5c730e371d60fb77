"""Metric writers: one JSON line per logged step (easy to plot) plus TensorBoard scalars."""

import json
import logging
import os
import time
from collections.abc import Mapping

import numpy as np

from scott_jax import storage

log = logging.getLogger(__name__)

#: The least time between two uploads of the metrics to cloud storage, where each upload
#: rewrites the whole file (and TensorBoard's event file): writing at every logged step
#: would stall a fast step. Local files are flushed at every write.
CLOUD_FLUSH_SECONDS = 30.0


class MetricWriter:
    """Appends `{"step": s, ...}` lines to `workdir/metrics.jsonl` and writes TensorBoard events.

    Appending (not truncating) keeps the history of a run that was resumed; rows after the
    resume step are what the resumed run wrote. A torn last line (a run killed mid-write) is
    cut off first, so it never ends up inside the file. On cloud storage, where objects cannot
    be appended to, the file is rewritten whole, at most every `CLOUD_FLUSH_SECONDS`, at
    `flush` (the loop's at every checkpoint) and at `close` (which the loop calls even when it
    fails). Only process 0 should write.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
        storage.makedirs(workdir)
        self.path = storage.join(workdir, "metrics.jsonl")
        _cut_torn_line(self.path)
        self._file = open(self.path, "a") if storage.is_local(self.path) else None
        cloud_text = self._file is None and storage.exists(self.path)
        self._text = storage.read_text(self.path) if cloud_text else ""
        self._uploaded = time.monotonic()  # cloud only: when the text was last written
        self._pending = False
        self._tb = None
        if tensorboard:
            import tensorflow as tf  # already imported by the data pipeline

            self._tf = tf
            self._tb = tf.summary.create_file_writer(storage.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": int(step), "time": time.time()}
        row.update({k: float(np.asarray(v)) for k, v in metrics.items()})
        line = json.dumps(row) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._text, self._pending = self._text + line, True
        if self._tb is not None:
            with self._tb.as_default(step=int(step)):
                for key, value in row.items():
                    if key not in ("step", "time"):
                        self._tf.summary.scalar(key, value)
        if self._file is not None or time.monotonic() - self._uploaded >= CLOUD_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Everything written so far to the files (one upload of each on cloud storage)."""
        if self._pending:
            storage.write_text(self.path, self._text)
            self._uploaded, self._pending = time.monotonic(), False
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _cut_torn_line(path: str) -> None:
    """Truncates `path` after its last newline, if anything follows it."""
    if not storage.is_local(path) or not os.path.exists(path):
        return  # a cloud object is written whole, never torn
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("Cutting the torn last line of %s (a run stopped mid-write).", path)
            f.truncate(end)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The rows of `workdir/metrics.jsonl`, in file order. A torn last line (a run killed
    mid-write) is skipped with a warning; a bad line elsewhere is an error naming the file."""
    path = storage.join(workdir, "metrics.jsonl")
    lines = [line for line in storage.read_text(path).split("\n") if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not JSON: {e}") from e
            log.warning("Skipping the torn last line of %s (a run stopped mid-write).", path)
    return rows


def log_progress(
    step: int, total: int, images_per_sec: float, seconds_left: float, metrics
) -> None:
    """One human-readable progress line: step, throughput, ETA and the main metrics."""
    days, rest = divmod(int(max(0.0, seconds_left)), 86400)
    eta = (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
    log.info(
        "step %d/%d (%.1f%%) | %.1f img/s | ETA %s | %s",
        step,
        total,
        100.0 * step / total,
        images_per_sec,
        eta,
        shown,
    )
