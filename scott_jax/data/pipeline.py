"""Batches for pretraining and evaluation: shuffle, augment, batch, split across hosts.

Determinism contract of ``pretrain_batches``: the batch of global step ``s`` is a pure function
of (seed, s, process_index, process_count) and the source. Each epoch is a seeded permutation
cut into full batches (drop_last, as the reference's training loaders), and each example's
augmentation is seeded by its position in the global stream, so a resumed run skips at the
index level and yields exactly what the uninterrupted run yielded, with no iterator state.

Every process computes the same global batch of indices and reads and decodes only its own
contiguous slice, so the stream does not depend on the number of hosts. The per-example work
runs in a ``tf.data`` map (parallel, deterministic order; TensorFlow kept off the GPU). See
docs/design.md#input-pipeline.
"""

import logging
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from scott_jax import storage
from scott_jax.data import augment
from scott_jax.data.sources import Source, decode_image
from scott_jax.optim import steps_per_epoch  # the one definition of an epoch's steps

log = logging.getLogger(__name__)

# Mixed into the run seed so that shuffling and augmentation draw from different streams.
_SHUFFLE_STREAM = 0x73687566  # "shuf"
_AUGMENT_STREAM = 0x61756721  # "aug!"


def pretrain_batches(
    source: Source,
    *,
    batch_size: int,
    img_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    aug: str = "none",
    color_on_device: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite stream of this host's part of each global pretraining batch, from ``start_step``.

    Yields numpy dicts with b = batch_size // process_count rows:
      'context': float32 [b, img_size, img_size, 3], the context (masked) view;
      'target':  float32 [b, img_size, img_size, 3], the target view;
      'label':   int32 [b], for the online probe only.
    Both views come from one RandomResizedCrop + flip of the image and differ only by their
    colour augmentation ``aug`` (docs/design.md#augmentation), except with ``aug='moca'``: a
    crop each (``augment.moca_views``). Errors are raised here, not at the first ``next``.

    color_on_device: yield instead 'view': uint8 [b, img_size, img_size, 3], the shared crop +
    flip before any colour op or normalisation, and 'label'. The jitted step then makes the
    two views with ``device_augment.two_views`` (same ``aug``): the host decodes, crops and
    resizes only, and sends an eighth of the bytes (one uint8 view instead of two float32).
    """
    lo, hi = _local_rows(batch_size, process_index, process_count)
    epoch_steps = steps_per_epoch(source.num_examples, batch_size)
    augment.check_aug(aug)
    if color_on_device and aug == "moca":
        raise ValueError("aug='moca' crops each view on its own; color_on_device needs one crop")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    start_epoch, start_offset = divmod(start_step, epoch_steps)
    shuffle_key = tf.constant([seed, _SHUFFLE_STREAM], tf.int64)
    augment_key = tf.constant([seed, _AUGMENT_STREAM], tf.int64)
    num_examples = source.num_examples

    def epoch_rows(epoch):
        """(index, stream position) of this host's examples in epoch ``epoch``, from the start."""
        order = _epoch_order(shuffle_key, epoch, num_examples)
        index = tf.reshape(order[: epoch_steps * batch_size], [epoch_steps, batch_size])
        first = tf.where(epoch == start_epoch, tf.constant(start_offset, tf.int64), 0)
        steps = epoch * epoch_steps + tf.range(first, epoch_steps, dtype=tf.int64)  # [S]
        position = steps[:, None] * batch_size + tf.range(lo, hi, dtype=tf.int64)  # [S, b]
        index = index[first:, lo:hi]  # [S, b]
        return tf.data.Dataset.from_tensor_slices(
            (tf.reshape(index, [-1]), tf.reshape(position, [-1]))
        )

    window_at = _window_reader(source, crop_scale)
    labels = tf.constant(source.labels)

    def example(index, position):
        seed_pair = tf.random.experimental.stateless_fold_in(augment_key, position)
        if aug == "moca":  # a crop per view, 'context' the first
            context, target = augment.moca_views(
                lambda crop_seed: window_at(index, crop_seed), seed_pair, img_size
            )
            label = tf.gather(labels, index)
            return {"context": context, "target": target, "label": label, "position": position}
        crop_seed, flip_seed, context_seed, target_seed = augment.view_seeds(seed_pair)
        window = window_at(index, crop_seed)
        view = augment.random_flip(augment.resize_window(window, img_size), flip_seed)
        label = tf.gather(labels, index)
        if color_on_device:
            return {"view": view, "label": label, "position": position}
        context, target = augment.color_views(view, context_seed, target_seed, aug)
        return {"context": context, "target": target, "label": label, "position": position}

    ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch_rows)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if source.storage == "files":
        # A file that vanished or changed since the start-up scan fails its read; the example
        # is dropped (and counted by `Batches`) instead of stopping the run.
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(hi - lo, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return Batches(
        ds.as_numpy_iterator(), start_step=start_step, batch_size=batch_size, lo=lo, hi=hi
    )


def pretrain_indices(
    source: Source,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """The stream of a cached run (``config.data.cache``): ``pretrain_batches``' examples in
    the same batches, as references for ``device_cache.with_views`` instead of pixels.

    Yields numpy dicts with this host's b = batch_size // process_count rows: 'context' and
    'target' (one array), int32 [b, 2] of (example index, position in the global stream),
    from which the step makes both views; and 'label', int32 [b]. Same determinism contract
    as ``pretrain_batches``; the host work is one shuffle per epoch and a slice per step.
    """
    lo, hi = _local_rows(batch_size, process_index, process_count)
    epoch_steps = steps_per_epoch(source.num_examples, batch_size)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    shuffle_key = tf.constant([seed, _SHUFFLE_STREAM], tf.int64)
    labels = np.asarray(source.labels, np.int32)

    def generate():
        epoch, offset = divmod(start_step, epoch_steps)
        while True:
            order = _epoch_order(shuffle_key, tf.constant(epoch, tf.int64), source.num_examples)
            order = order.numpy()[: epoch_steps * batch_size].reshape(epoch_steps, batch_size)
            for row in range(offset, epoch_steps):
                first = (epoch * epoch_steps + row) * batch_size
                if first + batch_size > 2**31:
                    raise OverflowError("stream positions beyond 2^31 do not fit the int32 refs")
                index = order[row, lo:hi].astype(np.int32)
                refs = np.stack([index, np.arange(first + lo, first + hi, dtype=np.int32)], 1)
                yield {
                    "context": refs,
                    "target": refs,
                    "label": labels[index],
                    "position": refs[:, 1],
                }
            epoch, offset = epoch + 1, 0

    return Batches(generate(), start_step=start_step, batch_size=batch_size, lo=lo, hi=hi)


def _epoch_order(shuffle_key: tf.Tensor, epoch, num_examples: int) -> tf.Tensor:
    """int64 [N]: epoch ``epoch``'s permutation of the example indices (int64 ``epoch``)."""
    key = tf.random.experimental.stateless_fold_in(shuffle_key, epoch)
    return tf.random.experimental.stateless_shuffle(tf.range(num_examples, dtype=tf.int64), key)


class Batches:
    """The iterator of `pretrain_batches`: numpy batches without their stream positions, and
    `skipped`, the number of examples dropped so far because their file could not be read
    (the positions of this host's slice that the stream jumped over)."""

    def __init__(self, iterator, *, start_step: int, batch_size: int, lo: int, hi: int):
        self._iterator = iterator
        self._batch_size, self._lo, self._local = batch_size, lo, hi - lo
        self._seen = self._count_upto(start_step * batch_size - 1)
        self.skipped = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        position = batch.pop("position")
        count = self._count_upto(int(position[-1]))
        skipped = count - self._seen - len(position)
        self._seen = count
        if skipped:
            self.skipped += skipped
            log.warning(
                "%d example(s) skipped: their image file vanished or changed during the run "
                "(%d so far; TensorFlow's warning above names the file).",
                skipped,
                self.skipped,
            )
        return batch

    def _count_upto(self, position: int) -> int:
        """How many positions of this host's rows [lo, hi) of each global batch are <= it."""
        if position < 0:
            return 0
        step, row = divmod(position, self._batch_size)
        return step * self._local + min(max(row - self._lo + 1, 0), self._local)


def eval_batches(
    source: Source,
    *,
    batch_size: int,
    img_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in order, with the eval transform (`augment.eval_transform`).

    ``ceil(N / batch_size)`` global batches, the last padded to full size so every batch has the
    same static shape and every host the same number of batches. Yields numpy dicts with
    b = batch_size // process_count rows (this host's slice of each global batch):
      'image': float32 [b, img_size, img_size, 3];
      'label': int32 [b];
      'mask':  bool [b], False on padding (which repeats example 0), so metrics weight by it.
    """
    lo, hi = _local_rows(batch_size, process_index, process_count)
    num_batches = -(-source.num_examples // batch_size)
    position = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)[:, lo:hi]
    mask = position.reshape(-1) < source.num_examples
    index = np.where(mask, position.reshape(-1), 0)
    image_at = _image_reader(source)
    labels = tf.constant(source.labels)

    def example(i, valid):
        image = augment.normalize(augment.eval_transform(image_at(i), img_size))
        return {"image": image, "label": tf.gather(labels, i), "mask": valid}

    ds = tf.data.Dataset.from_tensor_slices((index, mask))
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(hi - lo, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()


def _image_reader(source: Source):
    """A function: example index (int64 scalar tensor) -> uint8 [H, W, 3], for tf.data maps.

    The source's images become one tensor, captured by the map (not embedded in the graph, so
    a Pets-sized 800 MB of JPEG bytes is fine); each call touches one example only.
    """
    if source.storage == "pixels":
        images = tf.constant(source.images)
        return lambda i: tf.gather(images, i)
    contents_at = _contents_reader(source)
    return lambda i: decode_image(contents_at(i))


def _window_reader(source: Source, crop_scale: tuple[float, float]):
    """A function: (example index, crop seed) -> its ``augment.crop_box`` window, uint8 [h, w, 3].

    ``augment.random_resized_crop`` without the resize, with the same window for the same seed.
    A JPEG (in memory or on disk) has only its window decoded (``decode_and_crop_jpeg``: the
    iDCT of the other blocks is skipped: ~1.2x faster decoding over the crop scales). Its
    pixels can differ from a full decode's by a few levels along the window's edge, where
    libjpeg upsamples the chroma from fewer neighbours; other formats are decoded in full.
    """
    if source.storage == "pixels":
        image_at = _image_reader(source)
        return lambda index, crop_seed: _crop(image_at(index), crop_seed, crop_scale)
    contents_at = _contents_reader(source, check_sizes=True)

    def jpeg_window(contents, crop_seed):
        shape = tf.image.extract_jpeg_shape(contents)
        box = augment.crop_box(shape[0], shape[1], crop_seed, crop_scale)
        return tf.image.decode_and_crop_jpeg(contents, box, channels=3)

    def file_window(index, crop_seed):
        contents = contents_at(index)
        window = tf.cond(
            tf.io.is_jpeg(contents),
            lambda: jpeg_window(contents, crop_seed),
            lambda: _crop(decode_image(contents), crop_seed, crop_scale),
        )
        window.set_shape([None, None, 3])
        return window

    return file_window


def _crop(image: tf.Tensor, crop_seed, crop_scale: tuple[float, float]) -> tf.Tensor:
    """uint8 [H, W, 3] -> its ``augment.crop_box`` window for ``crop_seed``, uint8 [h, w, 3]."""
    shape = tf.shape(image)
    top, left, height, width = tf.unstack(
        augment.crop_box(shape[0], shape[1], crop_seed, crop_scale)
    )
    return image[top : top + height, left : left + width]


def _contents_reader(source: Source, check_sizes: bool = False):
    """A function: example index -> the encoded file's bytes (scalar tf.string).

    check_sizes: a file whose size is not the one it had when this reader was made fails the
    read (InvalidArgumentError, naming the file), as a vanished one does (NotFoundError).
    """
    images = tf.constant(source.images)
    if source.storage == "encoded":
        return lambda i: tf.gather(images, i)
    if not check_sizes:
        return lambda i: tf.io.read_file(tf.gather(images, i))
    sizes = tf.constant([_size(path) for path in source.images.tolist()], tf.int64)

    def read_checked(i):
        path = tf.gather(images, i)
        contents = tf.io.read_file(path)
        changed = tf.debugging.Assert(
            tf.equal(tf.cast(tf.strings.length(contents), tf.int64), tf.gather(sizes, i)),
            ["image file changed size during the run:", path],
        )
        with tf.control_dependencies([changed]):
            return tf.identity(contents)

    return read_checked


def _size(path: str) -> int:
    """The file's size in bytes, or -1 if it cannot be read now (its read will fail)."""
    try:
        return storage.size_and_mtime_ns(path)[0]
    except OSError:
        return -1


def _local_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[lo, hi): the rows of each global batch that process ``process_index`` feeds."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
        )
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"global batch size {batch_size} must be a positive multiple of the process count "
            f"{process_count}"
        )
    local = batch_size // process_count
    return process_index * local, (process_index + 1) * local
