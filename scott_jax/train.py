"""Pretraining: the MIM-JEPA method (SPEC §6) and the method-agnostic resumable loop.

Sections: schedule lengths -> models and optimizer -> train state -> the step -> input
stream -> trainer -> the loop (`train_and_evaluate`). A method supplies a `Trainer` (its
jitted init and step, and the host-side stream that adds its masks to each batch);
`build_trainer` picks it from `config.method`: MIM-JEPA here, I-JEPA in `scott_jax.ijepa`
(which reuses this module's `TrainState`, probe and jit wiring). The steps are
module-level pure functions; the loop only wires a trainer to data, checkpoints and
metric writers, the same way for every method.

Multi-device: one ('data',) mesh over all devices; the batch is sharded over it, the train
state (params, optimizer state, EMA target) is replicated, and the same code runs on 1 or N
devices and on many hosts (each host feeds its own slice of the global batch).
"""

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax import masking, objectives, optim
from scott_jax.checkpoint import Checkpointer, preemption_guard
from scott_jax.data import device_augment  # JAX only: imports no TensorFlow
from scott_jax.models import build_predictor, encoder_from_config
from scott_jax.models.probes import SimpleAttentiveProbe
from scott_jax.models.transformer import gather_tokens
from scott_jax.sharding import make_mesh, to_global
from scott_jax.writers import MetricWriter, log_progress

log = logging.getLogger(__name__)

METHODS = ("mim_jepa", "ijepa")


# --------------------------------------------------------------------------- lengths


def schedule_lengths(config: ml_collections.ConfigDict, num_examples: int) -> dict[str, int]:
    """Epochs -> steps, the one place it happens (drop_last, as the reference; SPEC §6.5)."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the dataset ({num_examples} examples)"
        )
    if not 0 <= config.optim.lr_warmup_epochs <= config.num_epochs:
        raise ValueError(
            f"config.optim.lr_warmup_epochs={config.optim.lr_warmup_epochs} must lie in "
            f"[0, config.num_epochs={config.num_epochs}]"
        )
    return dict(
        steps_per_epoch=steps_per_epoch,
        total_steps=int(config.num_epochs * steps_per_epoch),
        warmup_steps=int(config.optim.lr_warmup_epochs * steps_per_epoch),
    )


# --------------------------------------------------------------------------- models


def check_method(config: ml_collections.ConfigDict) -> None:
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; expected one of {METHODS}")


def build_models(config: ml_collections.ConfigDict):
    """(encoder, predictor) of `config.method` from `config.variant`, `config.model.*` and
    the method's predictor fields (`config.predictor.*`, or `config.ijepa.*`)."""
    check_method(config)
    if config.method == "ijepa":
        from scott_jax import ijepa  # it imports this module

        return ijepa.build_models(config)
    encoder = encoder_from_config(config)
    predictor = build_predictor(
        encoder, depth=config.predictor.depth, double_rescale=config.predictor.double_rescale
    )
    return encoder, predictor


def optimizer_kwargs(config: ml_collections.ConfigDict, lengths: dict[str, int]) -> dict:
    """Arguments of `optim.make_optimizer` (and, with the EMA ones, `optim.schedule_values`)."""
    return optim.config_kwargs(
        config.optim, total_steps=lengths["total_steps"], warmup_steps=lengths["warmup_steps"]
    )


# --------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; a pytree of arrays (replicated over the mesh).

    params: {'context_encoder': ..., 'predictor': ...}, trained by `opt_state`'s AdamW.
    target_params: the EMA target encoder (same tree as the context encoder).
    probe: {'params', 'opt_state'} of the online monitoring probe, or None when it is off.
    """

    step: jax.Array
    params: dict
    target_params: dict
    opt_state: optax.OptState
    probe: dict | None = None


def create_train_state(rng, config, encoder, predictor, tx, probe=None, probe_tx=None):
    """Fresh state: target encoder = copy of the context encoder (SPEC §6.1)."""
    encoder_rng, predictor_rng, probe_rng = jax.random.split(rng, 3)
    images = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    context_params = encoder.init(encoder_rng, images)["params"]
    features = jnp.zeros((1, encoder.num_patches, encoder.embed_dim), jnp.float32)
    params = {
        "context_encoder": context_params,
        "predictor": predictor.init(predictor_rng, features)["params"],
    }
    probe_state = None
    if probe is not None:
        probe_params = probe.init(probe_rng, features)["params"]
        probe_state = {"params": probe_params, "opt_state": probe_tx.init(probe_params)}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=jax.tree.map(jnp.copy, context_params),
        opt_state=tx.init(params),
        probe=probe_state,
    )


# --------------------------------------------------------------------------- step


def train_step(
    state: TrainState,
    batch: dict,
    *,
    encoder,
    predictor,
    tx,
    schedules,
    seed: int,
    aug: str = "none",
    probe=None,
    probe_tx=None,
    num_kept: int | None = None,
):
    """One MIM-JEPA update (SPEC §6.2); returns (new state, metrics of this step).

    batch: 'context', 'target' [B, S, S, 3] (two views of the same crop), or instead 'view'
    [B, S, S, 3] uint8 (`config.data.color_on_device`: the crop, coloured here with `aug`),
    'keep_mask' [B, N] (1 = visible), and 'label' [B] when the online probe is on. Randomness
    is `fold_in(seed, step)`, so a resumed run draws the same dropout and colours as an
    uninterrupted one. `num_kept` (static) says every mask row keeps exactly that many
    tokens, as `masking`'s masks do: the SCOTT stem then skips the masked patches'
    convolutions (`Encoder`'s max_kept) and the predictor's last block and head run only
    at the masked tokens, which are all the loss reads (same loss and gradients). A row
    keeping a different number makes the loss NaN, which stops training, never silently
    wrong.
    """
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if "view" in batch:  # colour and normalise both views on the accelerator
        context_view, target_view = device_augment.two_views(
            batch["view"], jax.random.fold_in(rng, 2), aug
        )
        batch = {**batch, "context": context_view, "target": target_view}
    keep_mask = batch["keep_mask"]
    # 2. Targets: the EMA target encoder on the unmasked target view, LN'd, no gradient.
    targets = objectives.target_features(
        encoder.apply({"params": state.target_params}, batch["target"])
    )

    def loss_fn(params):
        # 3-4. Context encoder on the masked context view, then the predictor, train mode.
        enc_rng, pred_rng = jax.random.split(rng)
        context = encoder.apply(
            {"params": params["context_encoder"]},
            batch["context"],
            keep_mask,
            train=True,
            max_kept=num_kept,
            rngs=dict(zip(("dropout", "drop_path"), jax.random.split(enc_rng), strict=True)),
        )
        predict = functools.partial(
            predictor.apply,
            {"params": params["predictor"]},
            context,
            train=True,
            rngs=dict(zip(("dropout", "drop_path"), jax.random.split(pred_rng), strict=True)),
        )
        if num_kept is None:
            loss = objectives.masked_smooth_l1(predict(), targets, keep_mask)
        else:
            num_tokens = keep_mask.shape[1]
            queries, exact = objectives.masked_tokens(keep_mask, num_tokens - num_kept)
            loss = objectives.smooth_l1_at_masked(
                predict(queries=queries), gather_tokens(targets, queries), num_tokens
            )
            loss = jnp.where(exact.all(), loss, jnp.nan)
        return loss, pooled_std(objectives.target_features(context))

    # 5-6. Loss, gradients, AdamW with the scheduled LR / WD.
    (loss, context_std), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # 7. EMA of the context encoder into the target encoder, momentum m(k).
    values = schedules(state.step)
    target_params = optim.ema_update(state.target_params, params["context_encoder"], values["ema"])
    metrics = {
        "loss": loss,
        **values,
        "grad_norm/tokenizer": optax.tree.norm(grads["context_encoder"]["tokenizer"]),
        "grad_norm/transformer": optax.tree.norm(grads["context_encoder"]["transformer"]),
        "grad_norm/predictor": optax.tree.norm(grads["predictor"]),
        "target_std": pooled_std(targets),
        "context_std": context_std,
    }
    probe_state = state.probe
    if probe is not None:
        probe_state, probe_metrics = _probe_update(
            state.probe, targets, batch["label"], probe, probe_tx, jax.random.fold_in(rng, 1)
        )
        metrics.update(probe_metrics)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        target_params=target_params,
        opt_state=opt_state,
        probe=probe_state,
    )
    return new_state, metrics


def pooled_std(features: jax.Array) -> jax.Array:
    """Collapse monitor: channel-mean of the batch std of mean-pooled features [B, N, D].

    Near 0 means every image maps to the same representation (JEPA collapse). Logged for the
    target features ('target_std') and the context encoder's LN'd output on the masked,
    train-mode view ('context_std'). The latter also moves with the keep-mask and dropout, so
    it stays up when the features encode only patch position (on digits it fell to 0.05 by
    step 80, then rose to 0.17 while the context encoder's k-NN kept falling): read it next
    to `knn/context_top1` (`config.knn_every_epochs`), the monitor that needs labels but
    cannot be fooled that way.
    """
    return features.mean(axis=1).std(axis=0).mean()


def _probe_update(probe_state, features, labels, probe, probe_tx, rng):
    """SPEC §6.7: one step of the monitoring probe on the detached, LN'd target features."""

    def loss_fn(params):
        logits = probe.apply({"params": params}, features, train=True, rngs={"dropout": rng})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe_state["params"])
    updates, opt_state = probe_tx.update(grads, probe_state["opt_state"], probe_state["params"])
    params = optax.apply_updates(probe_state["params"], updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return {"params": params, "opt_state": opt_state}, {
        "probe/loss": loss,
        "probe/train_top1": accuracy,
    }


# --------------------------------------------------------------------------- input


def masked_batches(batches: Iterator[dict], config, grid: int, start_step: int) -> Iterator[dict]:
    """Adds the step's keep-masks [b, N] to each host-local batch (a pure function of the step)."""
    for step, batch in enumerate(batches, start=start_step):
        mask = masking.keep_masks(
            config.seed,
            step,
            batch["label"].shape[0],
            grid,
            config.mask.ratio,
            mask_type=config.mask.type,
            blocks_are=config.mask.blocks_are,
            process_index=jax.process_index(),
        )
        yield {**batch, "keep_mask": mask.astype(np.int32)}


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


# --------------------------------------------------------------------------- trainer


class Trainer(NamedTuple):
    """A method's pieces of a run on a mesh: jitted `init(rng) -> state` and
    `step(state, batch) -> (state, metrics)`, and `add_masks(batches, start_step)`, the
    host-side stream that turns data batches into step batches (run in the input thread).
    """

    init: Callable
    step: Callable
    grid_size: int
    data_sharding: NamedSharding
    state_sharding: NamedSharding
    add_masks: Callable[[Iterator[dict], int], Iterator[dict]]


def make_schedules(opt_kwargs: dict, config: ml_collections.ConfigDict, **kinds) -> Callable:
    """`count -> {'lr', 'wd', 'ema'}` for the optimizer built from `opt_kwargs` (logging, EMA)."""
    return functools.partial(
        optim.schedule_values,
        **{k: v for k, v in opt_kwargs.items() if k not in ("b1", "b2", "eps")},
        ema_start=config.optim.ema_start,
        ema_final=config.optim.ema_final,
        **kinds,
    )


def make_probe(num_classes: int | None, opt_kwargs: dict):
    """(probe, probe optimizer) of the online monitoring probe (SPEC §6.7), or (None, None)."""
    if num_classes is None:
        return None, None
    return SimpleAttentiveProbe(num_classes), optim.make_optimizer(**opt_kwargs)


def jit_trainer(
    mesh: jax.sharding.Mesh, init: Callable, step: Callable, grid_size: int, add_masks: Callable
) -> Trainer:
    """Jits a method's `init(rng)` and `step(state, batch)` over `mesh`: the state is
    replicated and donated, the batch sharded over 'data'."""
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    return Trainer(
        init=jax.jit(init, out_shardings=replicated),
        step=jax.jit(
            step,
            in_shardings=(replicated, data_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        ),
        grid_size=grid_size,
        data_sharding=data_sharding,
        state_sharding=replicated,
        add_masks=add_masks,
    )


def build_trainer(
    config: ml_collections.ConfigDict,
    lengths: dict[str, int],
    mesh: jax.sharding.Mesh,
    *,
    num_classes: int | None = None,
) -> Trainer:
    """The trainer of `config.method`: models, optimizer and schedules, jitted over `mesh`.

    `num_classes` turns on the online probe (SPEC §6.7). Used by the loop, the tests and
    the benchmarks.
    """
    check_method(config)
    if config.batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {mesh.size} devices")
    if config.method == "ijepa":
        from scott_jax import ijepa  # it imports this module

        return ijepa.build_trainer(config, lengths, mesh, num_classes=num_classes)
    encoder, predictor = build_models(config)
    opt_kwargs = optimizer_kwargs(config, lengths)
    tx = optim.make_optimizer(**opt_kwargs)
    probe, probe_tx = make_probe(num_classes, opt_kwargs)
    init = functools.partial(
        create_train_state,
        config=config,
        encoder=encoder,
        predictor=predictor,
        tx=tx,
        probe=probe,
        probe_tx=probe_tx,
    )
    step = functools.partial(
        train_step,
        encoder=encoder,
        predictor=predictor,
        tx=tx,
        schedules=make_schedules(opt_kwargs, config),
        seed=config.seed,
        aug=config.data.aug,
        probe=probe,
        probe_tx=probe_tx,
        num_kept=masking.num_kept(encoder.num_patches, config.mask.ratio),
    )

    def add_masks(batches: Iterator[dict], start_step: int) -> Iterator[dict]:
        return masked_batches(batches, config, encoder.grid_size, start_step)

    return jit_trainer(mesh, init, step, encoder.grid_size, add_masks)


# --------------------------------------------------------------------------- online k-NN


def knn_sources(config: ml_collections.ConfigDict):
    """(probe_train, test) sources of `config.data.name` for the online k-NN; an unlabeled
    dataset is an error here, before any training step."""
    from scott_jax.data import load_source

    try:
        return tuple(
            load_source(config.data.name, purpose, data_dir=config.data.data_dir)
            for purpose in ("probe_train", "test")
        )
    except ValueError as e:
        raise ValueError(f"config.knn_every_epochs needs labeled data (or set it to 0): {e}") from e


def online_knn(config: ml_collections.ConfigDict, state: TrainState, sources, mesh) -> dict:
    """k-NN top-1 (%, cosine, k=20, T=0.07) on mean-pooled, LN'd features of the eval-transform
    `probe_train` and `test` images, for the target and the context encoder (SPEC §8's k-NN,
    `scott_jax.probe.knn_accuracy`): a label-using monitor of representation quality, cheap
    enough to run every few epochs. Returns {'knn/target_top1', 'knn/context_top1'}."""
    from scott_jax.data import eval_batches
    from scott_jax.probe import extract_features, knn_accuracy

    encoder = encoder_from_config(config)
    row = {}
    for name, params in (
        ("target", state.target_params),
        ("context", state.params["context_encoder"]),
    ):
        (train_x, train_y), (test_x, test_y) = (
            extract_features(
                encoder,
                params,
                eval_batches(
                    source,
                    batch_size=config.batch_size,
                    img_size=config.img_size,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                ),
                mesh=mesh,
            )
            for source in sources
        )
        row[f"knn/{name}_top1"] = float(
            knn_accuracy(train_x, train_y, test_x, test_y, num_classes=sources[0].num_classes)
        )
    log.info(
        "k-NN top-1: target encoder %.2f, context encoder %.2f",
        row["knn/target_top1"],
        row["knn/context_top1"],
    )
    return row


# --------------------------------------------------------------------------- loop


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> TrainState:
    """Pretrains with `config.method`, resuming from the latest checkpoint in `workdir` if any.

    stop_at_step: end this run (with a checkpoint) after that many total steps, as a
    preemption would; re-running the same call continues from there.
    """
    from scott_jax.data import load_source, pretrain_batches  # TF only where data is read

    workdir = os.fspath(workdir)
    source = load_source(
        config.data.name,
        "pretrain",
        data_dir=config.data.data_dir,
        pretrain_split=config.data.pretrain_split,
    )
    if config.online_probe and source.num_classes < 2:
        raise ValueError(f"online_probe needs class labels, and {config.data.name!r} has none")
    knn_data = knn_sources(config) if config.knn_every_epochs else None
    lengths = schedule_lengths(config, source.num_examples)
    total_steps = lengths["total_steps"]
    trainer = build_trainer(
        config,
        lengths,
        make_mesh(),
        num_classes=source.num_classes if config.online_probe else None,
    )
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        save_interval_steps=config.checkpoint_every_steps,
    )
    rng = jax.random.key(config.seed)
    if checkpointer.latest_step() is None:
        state = trainer.init(rng)
        log.info(
            "Starting from scratch: %d steps (%d per epoch).",
            total_steps,
            lengths["steps_per_epoch"],
        )
    else:
        state = checkpointer.restore(jax.eval_shape(trainer.init, rng))
        log.info("Resumed from step %d of %d.", int(state.step), total_steps)
    start_step = int(state.step)

    local_batches = pretrain_batches(
        source,
        batch_size=config.batch_size,
        img_size=config.img_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        crop_scale=tuple(config.data.crop_scale),
        aug=config.data.aug,
        color_on_device=config.data.color_on_device,
    )
    batches = prefetch(trainer.add_masks(local_batches, start_step))
    writer = MetricWriter(workdir) if jax.process_index() == 0 else None
    if writer is not None:
        writer.write(start_step, {"data/skipped_files": len(source.skipped_files)})
    last_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    knn_interval = int(config.knn_every_epochs * lengths["steps_per_epoch"]) if knn_data else 0
    pending: list[tuple[int, dict]] = []
    last_saved = start_step if checkpointer.latest_step() is not None else None
    timer = (time.perf_counter(), start_step)

    def flush(step: int) -> None:
        """Fetches the metrics of the steps since the last flush; a non-finite loss stops."""
        nonlocal pending, timer
        if not pending:
            return
        rows = jax.device_get([m for _, m in pending])
        for (s, _), row in zip(pending, rows, strict=True):
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(
                    f"the loss became {row['loss']} at step {s}; stopping without saving. The "
                    f"last good checkpoint is step {last_saved} in {workdir}/checkpoints. Try a "
                    f"lower config.optim.lr_peak or config.compute_dtype='float32'."
                )
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
        now = time.perf_counter()
        images_per_sec = (step - timer[1]) * config.batch_size / max(now - timer[0], 1e-9)
        seconds_left = (last_step - step) * config.batch_size / max(images_per_sec, 1e-9)
        mean["images_per_sec"] = images_per_sec
        if writer is not None:
            writer.write(step, mean)
        log_progress(
            step, total_steps, images_per_sec, seconds_left, {k: mean[k] for k in ("loss", "lr")}
        )
        pending, timer = [], (now, step)

    def save(step: int, force: bool) -> None:
        nonlocal last_saved
        flush(step)  # never checkpoint a state whose loss went non-finite
        if checkpointer.save(step, state, config.to_dict(), force=force):
            last_saved = step

    try:
        with preemption_guard() as guard:
            step = start_step
            while step < last_step:
                batch = to_global(next(batches), trainer.data_sharding)
                state, metrics = trainer.step(state, batch)
                step += 1
                pending.append((step, metrics))
                if step % config.log_every_steps == 0:
                    flush(step)
                if knn_interval and (step % knn_interval == 0 or step == total_steps):
                    flush(step)  # the k-NN row comes after the step's loss row
                    row = online_knn(config, state, knn_data, trainer.data_sharding.mesh)
                    if writer is not None:
                        writer.write(step, row)
                if checkpointer.should_save(step):
                    save(step, force=False)
                if guard.requested:
                    log.warning("Stop requested at step %d: saving a checkpoint.", step)
                    break
            if last_saved != step:
                save(step, force=True)
            flush(step)
    finally:  # also on errors: finish the saves already started, release the input thread
        batches.close()
        checkpointer.close()
        if writer is not None:
            writer.close()
    return state
