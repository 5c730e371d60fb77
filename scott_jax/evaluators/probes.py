"""The frozen-feature probes of a pretraining run (`probe.py`): linear and attentive probes
trained together on a frozen backbone with the official evaluation recipe, scored on `test`,
with the epoch chosen by `selection`. The protocol is described in docs/design.md (Probes).
"""

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax import optim, storage
from scott_jax.errors import ConfigError
from scott_jax.evaluators.backbone import RANDOM, load_backbone
from scott_jax.evaluators.features import backbone_features, extract_features
from scott_jax.evaluators.knn import knn_scores
from scott_jax.evaluators.metrics import accuracies, classification_metrics
from scott_jax.evaluators.probe_steps import init_probe_state, probe_eval_counts, probe_train_step
from scott_jax.evaluators.selection import (
    check_selection_and_schedule,
    selection_note,
    selection_plan,
    summarize,
)
from scott_jax.models.probes import build_probes
from scott_jax.sharding import make_mesh, to_global
from scott_jax.writers import MetricWriter

log = logging.getLogger(__name__)

#: Fewer probe optimizer steps than this get a warning (see `run_probes`).
FEW_STEPS = 500


def run_probes(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains and scores the probes on a pretraining run; writes and returns the results.

    See the module docstring for the protocol and `configs/probe.py` for the fields. Returns
    the dict written to `WORKDIR/<output_dir>/results.json`: 'probes' {name: {'top1', 'top5',
    'mpc' (test, %), 'epoch', 'selection', 'select_split', 'select_top1', 'encoder'}}, 'best',
    'knn', 'selection' (rule, split, note), 'features' ('in_step' or 'cached'), 'train_steps'
    (optimizer steps of each probe), 'seconds', 'config' and the 'resolved' run-dependent
    settings.
    """
    storage.check(workdir, "--workdir")
    workdir = storage.resolve(workdir)
    _check_config(config)
    backbone = load_backbone(
        workdir, encoder=config.encoder, step=config.step, compute_dtype=config.compute_dtype
    )
    settings = _settings(config, backbone.train_config)
    rule, score_split = selection_plan(config.selection, config.use_probe_select)
    train_source, eval_sources = _load_sources(config, settings, rule, score_split)
    num_classes = train_source.num_classes
    mesh = make_mesh()
    for name in ("batch_size", "eval_batch_size"):
        if settings[name] % mesh.size:
            raise ConfigError(f"{name} {settings[name]} is not divisible by {mesh.size} devices")
    params = jax.device_put(backbone.params, NamedSharding(mesh, P()))

    # Features that never change: the evaluation splits (eval transform, frozen backbone),
    # and the training split too when it is not augmented.
    started = time.perf_counter()
    extract = functools.partial(
        _extract_split, backbone.encoder, params, settings["eval_batch_size"], mesh
    )
    eval_cache = {split: extract(source, pool=False) for split, source in eval_sources.items()}
    train_cache = None if config.augment else extract(train_source, pool=False)
    train_pooled = extract(train_source, pool=True) if config.augment else _pool(train_cache)
    feature_seconds = time.perf_counter() - started
    knn = _knn(train_pooled, _pool(eval_cache["test"]), num_classes, config.knn)
    log.info("k-NN (k=%d): test top-1 %.2f", config.knn.k, knn["top1"])

    probes = build_probes(num_classes, tuple(config.probes))
    data = _train_data(config, settings, backbone.encoder, train_source, train_cache)
    log.info(
        "Probing the %s of step %d: %s; %d epochs x %d steps, %s features.",
        encoder_words(backbone.which),
        backbone.step,
        ", ".join(probes),
        config.num_epochs,
        data.lengths.steps_per_epoch,
        "in-step (augmented)" if config.augment else "cached",
    )
    train_steps = data.lengths.total_steps
    if train_steps < FEW_STEPS:
        log.warning(
            "Only %d probe steps (%d epochs x %d): the reference's 100 epochs assume thousands "
            "of images, and probes on a few labels stay under-trained (on digits with 10 "
            "labels per class, 100 steps gave random features 24%% linear top-1, 1,000 steps "
            "82%%). Raise config.num_epochs; with config.augment=False epochs are cheap.",
            train_steps,
            config.num_epochs,
            data.lengths.steps_per_epoch,
        )
    default_dir = "probe_random" if backbone.which == RANDOM else "probe"
    output_dir = storage.join(workdir, config.output_dir or default_dir)
    history, seconds = _train_probes(
        config,
        probes,
        data,
        params if config.augment else None,
        eval_cache,
        num_classes=num_classes,
        eval_batch_size=settings["eval_batch_size"],
        mesh=mesh,
        output_dir=output_dir,
    )
    results = {
        "workdir": workdir,
        "checkpoint_step": backbone.step,
        "encoder": backbone.which,
        "dataset": settings["dataset"],
        "num_classes": num_classes,
        "train_examples": train_source.num_examples,
        "features": "in_step" if config.augment else "cached",
        "train_steps": train_steps,
        **summarize(
            history, tuple(probes), rule=rule, score_split=score_split, encoder=backbone.which
        ),
        "selection": {
            "requested": config.selection,
            "rule": rule,
            "split": score_split,
            "note": selection_note(rule, score_split, settings["dataset"]),
        },
        "knn": knn,
        "seconds": {"features": feature_seconds, **seconds},
        "config": config.to_dict(),
        "resolved": settings,
    }
    if jax.process_index() == 0:
        storage.write_text(storage.join(output_dir, "results.json"), json.dumps(results, indent=2))
    return results


class TrainData(NamedTuple):
    """The probes' training stream: what the step gets and how it turns it into features."""

    featurize: Callable  # (backbone params, x) -> LayerNorm'd features [B, N, D]
    epoch_batches: Callable[[int], Iterator[dict]]  # epoch (1-based) -> host-local batches
    lengths: optim.RunLengths


def _train_data(config, settings, encoder: nn.Module, source, cache) -> TrainData:
    """Augmented images with in-step features, or shuffled cached features (module doc, 3)."""
    from scott_jax.data import pretrain_batches

    batch_size = settings["batch_size"]
    lengths = optim.run_lengths(
        source.num_examples, batch_size, config.num_epochs, config.optim.lr_warmup_epochs
    )
    steps = lengths.steps_per_epoch
    if config.augment:
        # One view of the pretraining transform: the stream's context view (official `src/eval.py`).
        stream = pretrain_batches(
            source,
            batch_size=batch_size,
            img_size=encoder.img_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            crop_scale=settings["crop_scale"],
            aug=settings["aug"],
        )

        def augmented(epoch):
            del epoch  # the stream runs on; each epoch is its next `steps` batches
            for _ in range(steps):
                batch = next(stream)
                yield {"x": batch["context"], "label": batch["label"]}

        return TrainData(functools.partial(backbone_features, encoder), augmented, lengths)

    features, labels = cache
    lo, hi = _local_rows(batch_size)

    def shuffled(epoch):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(labels))
        for index in order[: steps * batch_size].reshape(steps, batch_size)[:, lo:hi]:
            yield {"x": features[index], "label": labels[index]}

    return TrainData(_cached_features, shuffled, lengths)


def _cached_features(params, x: jax.Array) -> jax.Array:
    """`TrainData.featurize` for cached features: they already are the features."""
    del params
    return x


def _train_probes(
    config,
    probes: Mapping[str, nn.Module],
    data: TrainData,
    backbone_params,
    eval_cache: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int,
    eval_batch_size: int,
    mesh: jax.sharding.Mesh,
    output_dir: str,
) -> tuple[list[dict], dict[str, float]]:
    """The epoch loop: (one history row per evaluated epoch, seconds spent training / scoring).

    Rows also go to `output_dir/metrics.jsonl`, which a new run replaces; `train_seconds` is
    the wall time of that epoch's training steps (the first includes compilation).
    """
    tx = optim.make(config.optim, data.lengths).tx
    replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    feature_shape = eval_cache["test"][0].shape
    state = jax.jit(
        functools.partial(init_probe_state, probes, tx, feature_shape, config.seed),
        out_shardings=replicated,
    )()
    train_step = jax.jit(
        functools.partial(
            probe_train_step, probes=probes, tx=tx, featurize=data.featurize, seed=config.seed
        ),
        in_shardings=(replicated, replicated, data_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        functools.partial(probe_eval_counts, probes=probes, num_classes=num_classes),
        in_shardings=(replicated, data_sharding),
        out_shardings=replicated,
    )
    storage.makedirs(output_dir)
    writer = None
    if jax.process_index() == 0:
        # A new probe run replaces the previous one's rows.
        storage.remove(storage.join(output_dir, "metrics.jsonl"))
        writer = MetricWriter(output_dir, tensorboard=False)
    history, seconds = [], {"train": 0.0, "eval": 0.0}
    try:
        for epoch in range(1, config.num_epochs + 1):
            started = time.perf_counter()
            step_metrics = []
            for batch in data.epoch_batches(epoch):
                batch = to_global(batch, data_sharding)
                state, metrics = train_step(state, backbone_params, batch)
                step_metrics.append(metrics)
            step_metrics = jax.device_get(step_metrics)
            epoch_seconds = time.perf_counter() - started
            seconds["train"] += epoch_seconds
            if epoch % config.eval_every_epochs and epoch != config.num_epochs:
                continue
            started = time.perf_counter()
            row = {"epoch": epoch, "train_seconds": epoch_seconds}
            row.update({k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]})
            for split, cache in eval_cache.items():
                counts = _evaluate(eval_step, state, cache, eval_batch_size, data_sharding)
                for name in probes:
                    for metric, value in accuracies(counts[name]).items():
                        row[f"{name}/{split}/{metric}"] = value
            seconds["eval"] += time.perf_counter() - started
            _check_finite(row, probes, epoch)
            history.append(row)
            if writer is not None:
                writer.write(epoch * data.lengths.steps_per_epoch, row)
            log.info("epoch %d/%d: %s", epoch, config.num_epochs, _progress(row, probes))
    finally:
        if writer is not None:
            writer.close()
    return history, seconds


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Errors for settings that would otherwise fail late or silently."""
    check_selection_and_schedule(config)
    if config.selection == "reference" and config.labels_per_class is not None:
        raise ConfigError(
            "selection='reference' reproduces the paper's full-label protocol; "
            "labels_per_class is for the honest rules"
        )


def _settings(config: ml_collections.ConfigDict, train_config: Mapping) -> dict:
    """The probe settings that default to the run's (config field None -> run's value)."""
    data = train_config["data"]
    batch_size = config.batch_size or train_config["batch_size"]
    return {
        "dataset": config.dataset or data["name"],
        "data_dir": config.data_dir if config.data_dir is not None else data.get("data_dir"),
        "batch_size": batch_size,
        "eval_batch_size": config.eval_batch_size or batch_size,
        "aug": config.aug if config.aug is not None else data["aug"],
        "crop_scale": tuple(config.crop_scale or data["crop_scale"]),
        "img_size": train_config["img_size"],
    }


def _load_sources(config, settings: Mapping, rule: str, score_split: str | None):
    """(training source, {split: evaluation source}) for the selection rule."""
    from scott_jax.data import Source, load_source

    def load(purpose, **kwargs):
        return load_source(settings["dataset"], purpose, settings["data_dir"], **kwargs)

    train = load("probe_train", labels_per_class=config.labels_per_class)
    evals = {"test": load("test")}
    if rule == "reference":
        # The reference's probe set is probe_train + probe_select (docs/design.md, Data splits).
        select = load("probe_select")
        train = Source(
            train.name,
            "probe_train",
            np.concatenate([train.images, select.images]),
            np.concatenate([train.labels, select.labels]),
            train.num_classes,
        )
    elif score_split == "probe_select":
        evals["probe_select"] = load("probe_select")
    return train, evals


def _local_rows(batch_size: int) -> tuple[int, int]:
    """[lo, hi): the rows of each global batch this process feeds."""
    local = batch_size // jax.process_count()
    return jax.process_index() * local, (jax.process_index() + 1) * local


def _extract_split(encoder, params, batch_size: int, mesh, source, *, pool: bool):
    """`extract_features` of a whole source under the eval transform (official
    `src/data/transforms.py`)."""
    from scott_jax.data import eval_batches

    batches = eval_batches(
        source,
        batch_size=batch_size,
        img_size=encoder.img_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return extract_features(encoder, params, batches, pool=pool, mesh=mesh)


def _pool(cache: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Cached patch features [M, N, D] -> their token mean [M, D] (float32), same labels."""
    features, labels = cache
    return features.astype(np.float32).mean(axis=1), labels


def _evaluate(eval_step, state, cache, batch_size: int, sharding: NamedSharding) -> dict:
    """Summed `probe_eval_counts` over cached (features [M, N, D], labels [M]), padded batches."""
    features, labels = cache
    lo, hi = _local_rows(batch_size)
    num_batches = -(-len(labels) // batch_size)
    position = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)[:, lo:hi]
    counts = []
    for rows in position:
        valid = rows < len(labels)
        index = np.where(valid, rows, 0)
        batch = {"x": features[index], "label": labels[index], "mask": valid}
        counts.append(eval_step(state, to_global(batch, sharding)))
    return jax.tree.map(lambda *c: np.sum(c, axis=0), *jax.device_get(counts))


def _knn(train: tuple[np.ndarray, np.ndarray], test, num_classes: int, knn_config) -> dict:
    """`knn_scores` on mean-pooled LayerNorm'd features [M, D], scored like logits."""
    scores = knn_scores(
        train[0],
        train[1],
        test[0],
        num_classes=num_classes,
        k=knn_config.k,
        temperature=knn_config.temperature,
    )
    return {
        **classification_metrics(scores, test[1], num_classes=num_classes),
        "k": knn_config.k,
        "temperature": knn_config.temperature,
    }


def _check_finite(row: Mapping, probes, epoch: int) -> None:
    for name in probes:
        if not np.isfinite(row[f"{name}/train/loss"]):
            raise FloatingPointError(
                f"probe {name!r} loss became {row[f'{name}/train/loss']} in epoch {epoch}; "
                "try a lower config.optim.lr_peak"
            )


def _progress(row: Mapping, probes) -> str:
    split = "probe_select" if any(k.endswith("/probe_select/top1") for k in row) else "test"
    return ", ".join(f"{name} {split} top-1 {row[f'{name}/{split}/top1']:.1f}" for name in probes)


def encoder_words(which: str) -> str:
    """'target encoder', 'random encoder'; a method's only encoder, named 'encoder', as is."""
    return which if which == "encoder" else f"{which} encoder"


def format_table(results: Mapping) -> str:
    """The results as a plain-text table (one row per probe, then k-NN and the best probe)."""
    selection = results["selection"]
    lines = [
        f"{results['dataset']}: {encoder_words(results['encoder'])} of step "
        f"{results['checkpoint_step']}"
        f", selection {selection['rule']}"
        + (f" on {selection['split']}" if selection["split"] else ""),
        f"{'probe':<8}{'epoch':>7}{'top-1':>9}{'top-5':>9}{'mpc':>9}",
    ]
    for name, entry in results["probes"].items():
        lines.append(
            f"{name:<8}{entry['epoch']:>7}{entry['top1']:>9.2f}{entry['top5']:>9.2f}"
            f"{entry['mpc']:>9.2f}"
        )
    knn = results["knn"]
    lines.append(
        f"{'k-NN':<8}{'k=' + str(knn['k']):>7}{knn['top1']:>9.2f}{knn['top5']:>9.2f}"
        f"{knn['mpc']:>9.2f}"
    )
    if results["best"] is not None:
        lines.append(f"best attentive probe: {results['best']}")
    lines.append(f"note: {selection['note']}")
    return "\n".join(lines)
