"""Supervised baselines: SCOTT or ViT trained end to end with labels (the paper's "from scratch").

    python launch.py --config configs/digits_supervised.py --workdir runs/digits_sup
    python launch.py --config configs/flowers_supervised.py --workdir runs/flowers_sup \
        --config.variant=vit-12/16

The paper compares its frozen MIM-JEPA features with the same architectures trained from
scratch with labels (SPEC §8.5; Flowers-102 top-1: ViT-12/16 71.08, SCOTT-12/16 79.13).
`train_and_evaluate(config, workdir)` trains such a model on the probes' labeled data and
scores it exactly as `scott_jax.probe` scores a probe, so the two kinds of rows compare:

1. Model: the encoder of `config.variant` (+ `config.model.*`, train mode: dropout and
   drop-path on) -> non-affine LayerNorm of its patch features (as before every probe, SPEC
   §8.1) -> the head `config.head` of `scott_jax.models.probes`, all trained jointly.
   NOTE(deviation): the paper does not say which head its from-scratch rows use. We use the
   probes' own heads on the probes' own features, so a supervised row and a probe row differ
   only in whether the backbone was trained with labels or frozen after MIM-JEPA. The default
   'linear' (mean pool -> LayerNorm -> linear) is also the usual global-average-pool ViT
   classifier; `--config.head=cross` gives the paper's attentive probe.
2. Data: `probe_train` (optionally `labels_per_class` examples of each class, the few-label
   setting), each example one view of the pretraining transform (RandomResizedCrop with
   `config.data.crop_scale`, flip, colour augmentation `config.data.aug`), as the augmented
   probes see it; the stream is `pretrain_batches`' context view, so batch s is a pure
   function of (seed, s).
3. Objective and optimiser: cross-entropy (`config.label_smoothing`, default none), AdamW
   with the config's warmup-flat-cosine LR and linear WD (`scott_jax.optim`, SPEC §6.4-6.5).
4. Evaluation: every `eval_every_epochs` epochs (and at the last) on `test` and, for model
   selection, `probe_select` (held out from the training data), eval transform.
   `config.selection`: 'holdout' reports the epoch with the best `probe_select` top-1 (ties to
   the later one), 'last' the last epoch; top-1, top-5 and mean-per-class accuracy come from
   `scott_jax.probe`'s metric functions.
5. Run: one jitted, donated step on the ('data',) mesh (batch sharded, state replicated);
   checkpoints (`Checkpointer`) every `checkpoint_every_steps` and at the end; re-running
   resumes from the latest, with the same batches and dropout as an uninterrupted run
   (`fold_in(seed, step)`). `WORKDIR/metrics.jsonl` + TensorBoard get the training rows
   (loss, train top-1, lr, wd) and one row per evaluation; `WORKDIR/<output_dir>/results.json`
   gets the probe-format results, also printed as a table.
"""

import functools
import json
import logging
import os
import time
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax import optim
from scott_jax.checkpoint import Checkpointer, preemption_guard
from scott_jax.models import Encoder, encoder_from_config
from scott_jax.models.probes import PROBES, build_probes
from scott_jax.models.transformer import layer_norm
from scott_jax.probe import (
    accuracies,
    check_selection_and_schedule,
    classification_counts,
    selection_plan,
    summarize,
)
from scott_jax.sharding import make_mesh, to_global
from scott_jax.writers import MetricWriter, log_progress, read_metrics

log = logging.getLogger(__name__)

METHOD = "supervised"
SELECTION_RULES = ("holdout", "last")
EVAL_SPLITS = ("test", "probe_select")


# --------------------------------------------------------------------------- model and state


class Classifier(nn.Module):
    """images [B, S, S, 3] -> logits [B, C]: encoder -> non-affine LayerNorm -> probe head."""

    encoder: Encoder
    head: nn.Module

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        features = layer_norm(self.encoder(images, train=train))  # [B, N, D]
        return self.head(features, train=train)


def build_classifier(config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
    """The encoder of `config.variant` / `config.model` with the `config.head` probe on top."""
    if config.head not in PROBES:
        raise ValueError(f"config.head must be one of {PROBES}, got {config.head!r}")
    head = build_probes(num_classes, (config.head,))[config.head]
    return Classifier(encoder_from_config(config), head)


@flax.struct.dataclass
class SupervisedState:
    """step, params {'encoder', 'head'} and AdamW state; a replicated pytree of arrays."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState


def create_state(rng, model: Classifier, tx, img_size: int) -> SupervisedState:
    images = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
    params = model.init(rng, images)["params"]
    return SupervisedState(jnp.zeros((), jnp.int32), params, tx.init(params))


# --------------------------------------------------------------------------- steps


def train_step(
    state: SupervisedState,
    batch: Mapping[str, jax.Array],
    *,
    model: Classifier,
    tx,
    lr_schedule,
    seed: int,
    label_smoothing: float,
):
    """One update on batch 'image' [B, S, S, 3], 'label' int [B]; returns (state, metrics).

    Dropout and drop-path draw from fold_in(seed, step), so a resumed run repeats them.
    """
    num_classes = model.head.num_classes
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    rngs = dict(zip(("dropout", "drop_path"), jax.random.split(rng), strict=True))
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), label_smoothing)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["image"], train=True, rngs=rngs)
        return optax.softmax_cross_entropy(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "train_top1": 100.0 * jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "lr": lr_schedule(state.step + 1),
        "grad_norm": optax.tree.norm(grads),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_counts(params, batch, *, model: Classifier) -> dict[str, jax.Array]:
    """`classification_counts` of the eval-mode model on an `eval_batches` batch."""
    logits = model.apply({"params": params}, batch["image"])
    return classification_counts(
        logits, batch["label"], batch["mask"], num_classes=model.head.num_classes
    )


# --------------------------------------------------------------------------- the run


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors for settings that would otherwise fail late or silently."""
    if config.method != METHOD:
        raise ValueError(f"config.method must be {METHOD!r}, got {config.method!r}")
    check_selection_and_schedule(config, SELECTION_RULES)
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"config.label_smoothing must lie in [0, 1), got {config.label_smoothing}")


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_at_step: int | None = None,
) -> dict | None:
    """Trains (or resumes) the supervised baseline; returns the results dict once finished.

    stop_at_step: end this run with a checkpoint after that many total steps, as a preemption
    would (returns None then); re-running the same call continues from there.
    """
    from scott_jax.data import eval_batches, load_source, pretrain_batches, steps_per_epoch

    check_config(config)
    workdir = os.fspath(workdir)
    data = config.data
    train_source = load_source(
        data.name, "probe_train", data.data_dir, labels_per_class=config.labels_per_class
    )
    eval_sources = {split: load_source(data.name, split, data.data_dir) for split in EVAL_SPLITS}
    epoch_steps = steps_per_epoch(train_source.num_examples, config.batch_size)
    total_steps = config.num_epochs * epoch_steps
    opt_kwargs = optim.config_kwargs(
        config.optim,
        total_steps=total_steps,
        warmup_steps=int(config.optim.lr_warmup_epochs * epoch_steps),
    )
    tx = optim.make_optimizer(**opt_kwargs)
    lr_schedule = optim.lr_schedule(
        **{k: opt_kwargs[k] for k in ("total_steps", "warmup_steps", "lr_start", "lr_peak")},
        lr_final=opt_kwargs["lr_final"],
        flat_pctg=opt_kwargs["flat_pctg"],
    )
    model = build_classifier(config, train_source.num_classes)
    mesh = make_mesh()
    if config.batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {mesh.size} devices")
    replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    init = jax.jit(
        functools.partial(create_state, model=model, tx=tx, img_size=config.img_size),
        out_shardings=replicated,
    )
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model=model,
            tx=tx,
            lr_schedule=lr_schedule,
            seed=config.seed,
            label_smoothing=config.label_smoothing,
        ),
        in_shardings=(replicated, data_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(eval_counts, model=model),
        in_shardings=(replicated, data_sharding),
        out_shardings=replicated,
    )

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        save_interval_steps=config.checkpoint_every_steps,
    )
    rng = jax.random.key(config.seed)
    if checkpointer.latest_step() is None:
        state = init(rng)
        history = []
        log.info(
            "Supervised %s + %s head from scratch on %d %s examples: %d steps (%d per epoch).",
            config.variant,
            config.head,
            train_source.num_examples,
            data.name,
            total_steps,
            epoch_steps,
        )
    else:
        state = checkpointer.restore(jax.eval_shape(init, rng))
        history = _eval_history(workdir, int(state.step))
        log.info("Resumed from step %d of %d.", int(state.step), total_steps)
    start_step = int(state.step)

    stream = pretrain_batches(
        train_source,
        batch_size=config.batch_size,
        img_size=config.img_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        crop_scale=tuple(data.crop_scale),
        aug=data.aug,
    )

    def evaluate(epoch: int, step: int) -> dict:
        row = {"epoch": epoch}
        for split, source in eval_sources.items():
            batches = eval_batches(
                source,
                batch_size=config.batch_size,
                img_size=config.img_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            counts = [eval_fn(state.params, to_global(b, data_sharding)) for b in batches]
            summed = jax.tree.map(lambda *c: np.sum(c, axis=0), *jax.device_get(counts))
            for metric, value in accuracies(summed).items():
                row[f"{config.head}/{split}/{metric}"] = value
        log.info(
            "epoch %d (step %d): test top-1 %.2f, probe_select top-1 %.2f",
            epoch,
            step,
            row[f"{config.head}/test/top1"],
            row[f"{config.head}/probe_select/top1"],
        )
        return row

    writer = MetricWriter(workdir) if jax.process_index() == 0 else None
    last_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    pending: list[dict] = []
    timer = (time.perf_counter(), start_step)
    started = time.perf_counter()

    def flush(step: int) -> None:
        nonlocal pending, timer
        if not pending:
            return
        rows = jax.device_get(pending)
        if not all(np.isfinite(r["loss"]) for r in rows):
            raise FloatingPointError(
                f"the loss became non-finite before step {step}; stopping without saving. Try "
                "a lower config.optim.lr_peak."
            )
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        now = time.perf_counter()
        mean["images_per_sec"] = (step - timer[1]) * config.batch_size / max(now - timer[0], 1e-9)
        if writer is not None:
            writer.write(step, mean)
        seconds_left = (last_step - step) * config.batch_size / max(mean["images_per_sec"], 1e-9)
        log_progress(
            step,
            total_steps,
            mean["images_per_sec"],
            seconds_left,
            {k: mean[k] for k in ("loss", "train_top1")},
        )
        pending, timer = [], (now, step)

    try:
        with preemption_guard() as guard:
            step = start_step
            while step < last_step:
                batch = next(stream)
                batch = {"image": batch["context"], "label": batch["label"]}
                state, metrics = step_fn(state, to_global(batch, data_sharding))
                step += 1
                pending.append(metrics)
                if step % config.log_every_steps == 0:
                    flush(step)
                epoch, within = divmod(step, epoch_steps)
                if not within and (not epoch % config.eval_every_epochs or step == total_steps):
                    flush(step)
                    row = evaluate(epoch, step)
                    history.append(row)
                    if writer is not None:
                        writer.write(step, row)
                if checkpointer.should_save(step):
                    flush(step)
                    checkpointer.save(step, state, config.to_dict())
                if guard.requested:
                    log.warning("Stop requested at step %d: saving a checkpoint.", step)
                    break
            flush(step)
            checkpointer.save(step, state, config.to_dict(), force=True)
    finally:
        checkpointer.close()
        if writer is not None:
            writer.close()
    if step < total_steps:
        return None
    results = _results(config, workdir, train_source, history, step, time.perf_counter() - started)
    if jax.process_index() == 0:
        output_dir = os.path.join(workdir, config.output_dir)
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
        print(format_table(results))
    return results


def _eval_history(workdir: str, up_to_step: int) -> list[dict]:
    """The evaluation rows a resumed run keeps: those up to its checkpoint, last write wins."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = {r["step"]: r for r in read_metrics(workdir) if "epoch" in r and r["step"] <= up_to_step}
    return [rows[s] for s in sorted(rows)]


def _results(config, workdir, train_source, history, step: int, seconds: float) -> dict:
    """The probe-format results (`scott_jax.probe.summarize`) of a finished run."""
    rule, score_split = selection_plan(config.selection, True)
    summary = summarize(history, (config.head,), rule=rule, score_split=score_split, encoder=METHOD)
    return {
        "workdir": os.path.abspath(workdir),
        "method": METHOD,
        "variant": config.variant,
        "head": config.head,
        "checkpoint_step": step,
        "encoder": METHOD,
        "dataset": config.data.name,
        "num_classes": train_source.num_classes,
        "train_examples": train_source.num_examples,
        "labels_per_class": config.labels_per_class,
        "probes": summary["probes"],
        "selection": {
            "requested": config.selection,
            "rule": rule,
            "split": score_split if rule == "holdout" else None,
            "note": (
                f"epochs chosen on {score_split}, held out from the training data"
                if rule == "holdout"
                else "reported at the last epoch"
            ),
        },
        "seconds_this_run": seconds,
        "config": config.to_dict(),
    }


def format_table(results: Mapping) -> str:
    """The results as a plain-text table in `scott_jax.probe.format_table`'s columns."""
    selection = results["selection"]
    lines = [
        f"{results['dataset']}: {results['variant']} trained supervised from scratch on "
        f"{results['train_examples']} examples, step {results['checkpoint_step']}, selection "
        f"{selection['rule']}" + (f" on {selection['split']}" if selection["split"] else ""),
        f"{'head':<8}{'epoch':>7}{'top-1':>9}{'top-5':>9}{'mpc':>9}",
    ]
    for name, entry in results["probes"].items():
        lines.append(
            f"{name:<8}{entry['epoch']:>7}{entry['top1']:>9.2f}{entry['top5']:>9.2f}"
            f"{entry['mpc']:>9.2f}"
        )
    return "\n".join(lines)
