"""The supervised baseline (the paper's "from scratch" rows, paper §4): the encoder of
`config.variant` trained end to end with labels on the probes' training data, then scored
exactly as a probe is, so a supervised row and a probe row differ only in how the backbone
was trained. The recipe is described in docs/design.md (Supervised baseline).
"""

import functools
import json
import logging
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

from scott_jax import optim, storage
from scott_jax.config_checks import Checks
from scott_jax.evaluators import Evaluator
from scott_jax.evaluators.metrics import accuracies, classification_counts
from scott_jax.evaluators.selection import check_selection_and_schedule, selection_plan, summarize
from scott_jax.methods.base import Trainer, jit_trainer
from scott_jax.models import Encoder, encoder_from_config
from scott_jax.models.probes import PROBES, build_probes
from scott_jax.models.transformer import layer_norm
from scott_jax.sharding import to_global
from scott_jax.writers import read_metrics

log = logging.getLogger(__name__)

NAME = "supervised"
#: The trained encoder, for probe.py and the exports: name -> path in the train state.
ENCODERS = {"encoder": ("params", "encoder")}
SELECTION_RULES = ("holdout", "last")
EVAL_SPLITS = ("test", "probe_select")


def check_config(config: ml_collections.ConfigDict) -> None:
    """The baseline's own fields, before any data is read or anything compiled."""
    check_selection_and_schedule(config, SELECTION_RULES)
    c = Checks(config)
    c.number("label_smoothing", low=0, high=1, high_open=True)
    c.choice("head", PROBES)
    c.number("labels_per_class", low=1, integer=True, optional=True)
    if config.data.color_on_device:
        c.fail(
            "config.data.color_on_device is for the pretraining methods' two views; the "
            "supervised baseline reads one view: set it to False"
        )
    c.done()


def build_encoder(config: Mapping, compute_dtype: str | None = None) -> Encoder:
    """The SCOTT / ViT encoder of a run config (ConfigDict or the dict saved with it)."""
    return encoder_from_config(config, compute_dtype)


def train_source(config: ml_collections.ConfigDict):
    """`probe_train` of the dataset (or `labels_per_class` examples of each class)."""
    from scott_jax.data import load_source  # TensorFlow only where data is read

    return load_source(
        config.data.name,
        "probe_train",
        config.data.data_dir,
        labels_per_class=config.labels_per_class,
    )


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
    head = build_probes(num_classes, (config.head,))[config.head]
    return Classifier(build_encoder(config), head)


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
    schedules,
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
        **schedules(state.step),
        "grad_norm": optax.tree.norm(grads),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_counts(params, batch, *, model: Classifier) -> dict[str, jax.Array]:
    """`classification_counts` of the eval-mode model on an `eval_batches` batch."""
    logits = model.apply({"params": params}, batch["image"])
    return classification_counts(
        logits, batch["label"], batch["mask"], num_classes=model.head.num_classes
    )


def image_batches(batches, start_step: int):
    """The data stream's first view as the step's 'image' (one view of the pretraining
    transform, as the augmented probes see it)."""
    del start_step  # no masks
    for batch in batches:
        yield {"image": batch["context"], "label": batch["label"]}


# --------------------------------------------------------------------------- trainer


def build_trainer(
    config: ml_collections.ConfigDict, lengths: optim.RunLengths, mesh: jax.sharding.Mesh, source
) -> Trainer:
    """The classifier and AdamW (warmup-flat-cosine LR, linear WD) jitted over `mesh`, the
    evaluation on `test` and `probe_select` every `eval_every_epochs`, and the results."""
    from scott_jax.data import eval_batches, load_source

    model = build_classifier(config, source.num_classes)
    optimizer = optim.make(config.optim, lengths)
    init = functools.partial(create_state, model=model, tx=optimizer.tx, img_size=config.img_size)
    step = functools.partial(
        train_step,
        model=model,
        tx=optimizer.tx,
        schedules=optimizer.schedules,
        seed=config.seed,
        label_smoothing=config.label_smoothing,
    )
    trainer = jit_trainer(mesh, init, step, add_masks=image_batches)
    replicated = NamedSharding(mesh, P())
    eval_fn = jax.jit(
        functools.partial(eval_counts, model=model),
        in_shardings=(replicated, trainer.data_sharding),
        out_shardings=replicated,
    )
    eval_sources = {
        split: load_source(config.data.name, split, config.data.data_dir) for split in EVAL_SPLITS
    }

    def evaluate(state, step: int) -> dict[str, float]:
        row = {"epoch": step // lengths.steps_per_epoch}
        for split, eval_source in eval_sources.items():
            batches = eval_batches(
                eval_source,
                batch_size=config.batch_size,
                img_size=config.img_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            counts = [eval_fn(state.params, to_global(b, trainer.data_sharding)) for b in batches]
            summed = jax.tree.map(lambda *c: np.sum(c, axis=0), *jax.device_get(counts))
            for metric, value in accuracies(summed).items():
                row[f"{config.head}/{split}/{metric}"] = value
        log.info(
            "epoch %d (step %d): test top-1 %.2f, probe_select top-1 %.2f",
            row["epoch"],
            step,
            row[f"{config.head}/test/top1"],
            row[f"{config.head}/probe_select/top1"],
        )
        return row

    def finish(workdir: str, step: int) -> dict | None:
        return write_results(config, workdir, source, step)

    return trainer._replace(
        evaluators=(Evaluator(config.eval_every_epochs * lengths.steps_per_epoch, evaluate),),
        progress_keys=("loss", "train_top1"),
        finish=finish,
    )


# --------------------------------------------------------------------------- results


def eval_history(workdir: str, up_to_step: int) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl up to `up_to_step`; a step evaluated twice
    (a run resumed from an earlier checkpoint) keeps its last row."""
    rows = {r["step"]: r for r in read_metrics(workdir) if "epoch" in r and r["step"] <= up_to_step}
    return [rows[s] for s in sorted(rows)]


def write_results(config, workdir: str, source, step: int) -> dict | None:
    """The probe-format results of a finished run (`summarize` of its evaluation rows in
    metrics.jsonl), written to WORKDIR/<output_dir>/results.json and printed as a table by
    process 0, which holds the metrics (None on the other processes)."""
    if jax.process_index() != 0:
        return None
    rule, score_split = selection_plan(config.selection, True)
    history = eval_history(workdir, step)
    summary = summarize(history, (config.head,), rule=rule, score_split=score_split, encoder=NAME)
    results = {
        "workdir": storage.resolve(workdir),
        "method": NAME,
        "variant": config.variant,
        "head": config.head,
        "checkpoint_step": step,
        "encoder": NAME,
        "dataset": config.data.name,
        "num_classes": source.num_classes,
        "train_examples": source.num_examples,
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
        "config": config.to_dict(),
    }
    output_dir = storage.join(workdir, config.output_dir)
    storage.makedirs(output_dir)
    storage.write_text(storage.join(output_dir, "results.json"), json.dumps(results, indent=2))
    print(format_table(results))
    return results


def format_table(results: Mapping) -> str:
    """The results as a plain-text table in the probes' table's columns."""
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
