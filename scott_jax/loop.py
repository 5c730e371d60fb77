"""The one training loop, for every method: data stream -> jitted step -> metrics ->
checkpoints, pre-emption, periodic evaluators, exact resume.

`train_and_evaluate(config, workdir)` picks `config.method` once (`methods.of`), streams the
method's source through the method's host-side masks into its jitted step on a ('data',)
mesh (batch sharded, state replicated), and resumes from the latest checkpoint in `workdir`.
Batches, masks and randomness are pure functions of (seed, step), so a resumed run repeats
an uninterrupted one exactly. Metrics go to WORKDIR/metrics.jsonl and TensorBoard.
"""

import contextlib
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax import methods, optim, storage, workdir_lock
from scott_jax.checkpoint import Checkpointer, preemption_guard
from scott_jax.config_checks import check_common
from scott_jax.errors import ConfigError, DataError, DivergedError
from scott_jax.sharding import make_mesh, to_global
from scott_jax.writers import MetricWriter, log_progress

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """What `train_and_evaluate` returns: the final state, the method's results when it has
    any and the run finished (the supervised baseline's scores), and the signal that stopped
    the run early (after saving), or None."""

    state: Any
    results: dict | None
    interrupted: signal.Signals | None = None


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Runs `iterator` in a background thread so host work (masks, tf.data) overlaps the step."""
    items: queue.Queue = queue.Queue(maxsize=size)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                if not put(item):
                    return
        except Exception as e:  # re-raised in the consumer, with its traceback
            put(e)
        put(done)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()  # the consumer is gone (closed or failed): let the producer end


class StepMetrics:
    """The metrics of the steps since the last flush: fetched from the device together (no
    sync per step), checked (a non-finite loss stops the run), averaged, written and shown."""

    def __init__(self, writer, stream, *, batch_size, total_steps, last_step, start_step, keys):
        self.writer, self.stream, self.batch_size, self.keys = writer, stream, batch_size, keys
        self.total_steps, self.last_step = total_steps, last_step
        self.pending: list[tuple[int, dict]] = []
        self.timer = (time.perf_counter(), start_step)

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self, step: int, last_good: str) -> None:
        """`last_good` names the last checkpoint for the message of a non-finite loss."""
        if not self.pending:
            return
        rows = jax.device_get([m for _, m in self.pending])
        for (s, _), row in zip(self.pending, rows, strict=True):
            what = None
            if not np.isfinite(row["loss"]):
                what = f"the loss became {row['loss']}"
            elif not row.get("state_finite", 1.0):
                what = f"the loss is {row['loss']:.4g} but the parameters or optimizer state"
                what += " became non-finite"
            if what:
                raise DivergedError(
                    f"{what} at step {s}; stopping without saving. The last good checkpoint "
                    f"is {last_good}. Try a lower config.optim.lr_peak or "
                    "config.compute_dtype='float32'."
                )
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
        now = time.perf_counter()
        images_per_sec = (step - self.timer[1]) * self.batch_size / max(now - self.timer[0], 1e-9)
        seconds_left = (self.last_step - step) * self.batch_size / max(images_per_sec, 1e-9)
        mean["images_per_sec"] = images_per_sec
        mean["data/skipped_during_run"] = self.stream.skipped
        if self.writer is not None:
            self.writer.write(step, mean)
        shown = {k: mean[k] for k in self.keys}
        log_progress(step, self.total_steps, images_per_sec, seconds_left, shown)
        self.pending, self.timer = [], (now, step)


def stop_requested(guard) -> bool:
    """Whether any process got a stop signal: all processes agree after every step, so every
    host stops, and saves, at the same step."""
    if jax.process_count() == 1:
        return guard.requested
    flags = multihost_utils.process_allgather(np.int32(guard.requested))
    return bool(np.max(flags))


def initial_state(trainer, checkpointer: Checkpointer, seed: int, fallback: bool):
    """The latest intact checkpoint's state (placed like `trainer.init`'s), or a fresh one."""
    rng = jax.random.key(seed)
    if checkpointer.latest_step() is None:
        return trainer.init(rng)
    replicated = NamedSharding(trainer.data_sharding.mesh, P())  # the state's placement
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(trainer.init, rng),
    )
    state = checkpointer.restore(abstract, fallback=fallback)
    log.info("Resumed from step %d.", int(state.step))
    return state


def color_on_device(config: ml_collections.ConfigDict, trainer) -> bool:
    """`config.data.color_on_device`; None: on when the method's step can colour the views
    (`Trainer.colours_views`: MIM-JEPA) from one crop (not `aug='moca'`) on a GPU or TPU,
    which takes half the host's work per image off the input pipeline."""
    if config.data.color_on_device is not None:
        return bool(config.data.color_on_device)
    accelerator = jax.default_backend() != "cpu"
    return trainer.colours_views and config.data.aug != "moca" and accelerator


def input_stream(
    config: ml_collections.ConfigDict, source, start_step: int, cached=False, on_device=False
):
    """This process's slice of the batches from `start_step` on (a pure function of the step),
    a `data.pipeline.Batches` that counts the examples whose file could not be read.
    cached: the images are in a device cache; the batches hold references to them.
    on_device: yield one uint8 crop, 'view', that the step colours (`color_on_device`)."""
    from scott_jax.data import pretrain_batches, pretrain_indices  # TensorFlow only here

    if cached:
        return pretrain_indices(
            source,
            batch_size=config.batch_size,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    return pretrain_batches(
        source,
        batch_size=config.batch_size,
        img_size=config.img_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        crop_scale=tuple(config.data.crop_scale),
        aug=config.data.aug,
        color_on_device=on_device,
    )


def cached_trainer_step(config: ml_collections.ConfigDict, source, mesh, trainer):
    """(the step the loop calls, whether the images are in a device cache): `trainer.step`, or
    with `config.data.cache` in effect the step that makes the views from the cache, which is
    built here, once per run (docs/data.md#the-device-cache)."""
    from scott_jax.data import cache_build, device_cache  # TensorFlow only where data is read

    one_crop = config.data.aug != "moca"  # MOCA's views have a crop each: stream them
    cache = cache_build.load_device_cache(
        source,
        mode=config.data.cache if one_crop else "none",
        img_size=config.img_size,
        cache_size=config.data.cache_size,
        budget_gb=config.data.cache_max_gb,
        mesh=mesh,
    )
    if cache is None:
        return trainer.step, False
    step = device_cache.cached_step(
        trainer.step,
        cache,
        seed=config.seed,
        img_size=config.img_size,
        crop_scale=config.data.crop_scale,
        aug=config.data.aug,
    )
    return step, True


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_at_step: int | None = None,
) -> Outcome:
    """Trains `config.method`, resuming from the latest intact checkpoint in `workdir`.

    Every config value is checked before anything is read or written; the run then holds the
    workdir's lock (`config.lock_workdir`) until it returns. stop_at_step: end this run (with
    a checkpoint) after that many total steps, as a preemption would; re-running the same
    call continues from there.
    """
    method = methods.of(config)
    mesh = make_mesh()
    check_common(config, mesh.size)
    log_devices(config)
    method.check_config(config)
    storage.check(workdir, "--workdir")
    workdir = storage.resolve(workdir)
    locked = config.lock_workdir and jax.process_index() == 0 and storage.is_local(workdir)
    if config.lock_workdir and not storage.is_local(workdir):
        log.info("No workdir lock on cloud storage (%s): start one run per workdir.", workdir)
    with workdir_lock.hold(workdir) if locked else contextlib.nullcontext():
        record_config(config, workdir)
        return run(config, workdir, method, mesh, stop_at_step)


def log_devices(config: ml_collections.ConfigDict) -> None:
    """Which devices the run uses, and a warning when an accelerator recipe runs on CPU."""
    devices = jax.devices()
    platform, kind = devices[0].platform, devices[0].device_kind
    log.info(
        "JAX %s on %s: %d device(s) of kind %r, %d process(es).",
        jax.__version__,
        platform,
        len(devices),
        kind,
        jax.process_count(),
    )
    if platform == "cpu" and config.img_size >= ACCELERATOR_IMG_SIZE:
        log.warning(
            "This %d px config is meant for a GPU or TPU but runs on the CPU: install JAX for "
            "your accelerator (README, Install) or expect it to be very slow.",
            config.img_size,
        )


#: Image sizes from which a config is an accelerator recipe (the paper's are 224 px).
ACCELERATOR_IMG_SIZE = 192


#: Fields a resumed run may change without `config.accept_config_changes`: they change how
#: the run is logged, saved or located, or how the same maths is laid out, not what it
#: trains.
MAY_CHANGE = (
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "knn_every_epochs",
    "lock_workdir",
    "checkpoint_fallback",
    "accept_config_changes",
    "model.flat_matmuls",
    "model.remat",
    "moca.grad_chunks",
    "data.data_dir",
    "data.accept_changed_dataset",
)


def flat_config(config: dict, prefix: str = "") -> dict:
    """{'optim.lr_peak': 5e-4, ...}: a config dict's leaves by dotted path (tuples as lists)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Logs the resolved config and keeps it as WORKDIR/config.json. Resuming a run with a
    config that differs from the recorded one in fields other than `MAY_CHANGE` is a
    ConfigError listing the differences, unless `config.accept_config_changes`."""
    current = json.loads(config.to_json())
    log.info("Config:\n%s", json.dumps(current, indent=1, sort_keys=True))
    path = storage.join(workdir, "config.json")
    if storage.exists(path):
        recorded = flat_config(json.loads(storage.read_text(path)))
        now = flat_config(current)
        # Fields only one side has come from another version of scott_jax: not a change.
        changed = [
            f"{key}: {recorded[key]!r} -> {now[key]!r}"
            for key in sorted(recorded.keys() & now.keys())
            if key not in MAY_CHANGE and recorded[key] != now[key]
        ]
        if changed and not config.accept_config_changes:
            raise ConfigError(
                f"the config differs from the one this run started with ({path}):\n  "
                + "\n  ".join(changed)
                + "\nresume with the same config, use a new --workdir, or set "
                "config.accept_config_changes=True"
            )
        if changed:
            log.warning("Resuming with a changed config: %s", "; ".join(changed))
    if jax.process_index() == 0:
        storage.write_text(path, json.dumps(current, indent=1, sort_keys=True))


def check_same_data(config: ml_collections.ConfigDict, source, saved: dict) -> None:
    """A resumed run reads the dataset its checkpoint was trained on (same size), unless
    `config.data.accept_changed_dataset`."""
    before = saved.get("num_examples")
    if before is None or before == source.num_examples:
        return
    message = (
        f"the dataset {config.data.name!r} has {source.num_examples} examples, but the run was "
        f"checkpointed with {before}: files were added or removed since"
    )
    if not config.data.accept_changed_dataset:
        raise DataError(
            f"{message}. Resuming would silently change the schedule; restore the data, or "
            "set config.data.accept_changed_dataset=True to continue on the new set"
        )
    log.warning("%s; continuing on the new set (config.data.accept_changed_dataset).", message)


def run(config, workdir: str, method, mesh, stop_at_step: int | None) -> Outcome:
    """`train_and_evaluate` after the checks, with the workdir held."""
    source = method.train_source(config)
    lengths = optim.run_lengths(
        source.num_examples, config.batch_size, config.num_epochs, config.optim.lr_warmup_epochs
    )
    trainer = method.build_trainer(config, lengths, mesh, source)
    total_steps = lengths.total_steps
    checkpointer = Checkpointer(
        storage.join(workdir, "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        save_interval_steps=config.checkpoint_every_steps,
    )
    state = initial_state(trainer, checkpointer, config.seed, config.checkpoint_fallback)
    start_step = int(state.step)
    if checkpointer.latest_step() is not None:
        check_same_data(config, source, checkpointer.restore_run(start_step))
    log.info(
        "%s on %d %s examples: step %d of %d (%d per epoch).",
        method.NAME,
        source.num_examples,
        config.data.name,
        start_step,
        total_steps,
        lengths.steps_per_epoch,
    )
    train_step, cached = cached_trainer_step(config, source, mesh, trainer)
    stream = input_stream(
        config, source, start_step, cached, on_device=color_on_device(config, trainer)
    )
    batches = prefetch(trainer.add_masks(stream, start_step))
    writer = MetricWriter(workdir) if jax.process_index() == 0 else None
    if writer is not None:
        writer.write(start_step, {"data/skipped_files": len(source.skipped_files)})
    last_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    metrics_log = StepMetrics(
        writer,
        stream,
        batch_size=config.batch_size,
        total_steps=total_steps,
        last_step=last_step,
        start_step=start_step,
        keys=trainer.progress_keys,
    )
    last_saved = start_step if checkpointer.latest_step() is not None else None

    def flush(step: int) -> None:
        metrics_log.flush(step, f"step {last_saved} in {workdir}/checkpoints")

    def save(step: int, force: bool) -> None:
        nonlocal last_saved
        flush(step)  # never checkpoint a state whose loss went non-finite
        facts = {"num_examples": source.num_examples}
        if checkpointer.save(step, state, config.to_dict(), force=force, run=facts):
            last_saved = step
            if writer is not None:  # the rows up to a checkpoint are never lost
                writer.flush()

    interrupted = None
    try:
        with preemption_guard() as guard:
            step = start_step
            while step < last_step:
                batch = to_global(next(batches), trainer.data_sharding)
                state, metrics = train_step(state, batch)
                step += 1
                metrics_log.add(step, metrics)
                if step % config.log_every_steps == 0:
                    flush(step)
                for evaluator in trainer.evaluators:
                    if step % evaluator.every_steps == 0 or step == total_steps:
                        flush(step)  # the evaluation row comes after the step's loss row
                        row = evaluator.run(state, step)
                        if writer is not None:
                            writer.write(step, row)
                if checkpointer.should_save(step):
                    save(step, force=False)
                if stop_requested(guard):
                    log.warning("Stop requested at step %d: saving a checkpoint.", step)
                    interrupted = guard.received or signal.SIGTERM  # another host's notice
                    break
            if last_saved != step:
                save(step, force=True)
            flush(step)
    finally:  # also on errors: finish the saves already started, release the input thread
        batches.close()
        checkpointer.close()
        if writer is not None:
            writer.close()
    finished = step == total_steps and trainer.finish is not None
    results = trainer.finish(workdir, step) if finished else None
    return Outcome(state, results, interrupted)
