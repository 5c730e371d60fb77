"""Frozen-feature probes on a pretrained run (SPEC §8), k-NN and classification metrics.

    python probe.py --workdir runs/digits                    # configs/probe.py
    python probe.py --workdir runs/flowers --config.encoder=target
    python probe.py --workdir runs/flowers --config.encoder=random   # the random-init baseline
    python probe.py --workdir runs/flowers --config.selection=reference --config.output_dir=ref

`run_probes(config, workdir)`:

1. Backbone (SPEC §8.1; header items 10, 15): the encoder is rebuilt from the run's saved
   config and its weights are read from the run's checkpoint: the context encoder (the
   reference's default) or the EMA target encoder (`config.encoder`). A missing checkpoint or
   one that does not match the encoder its config describes is an error, never a random
   backbone. `config.encoder='random'` is the random-init baseline: the same encoder with the
   run's initial weights (step 0: `encoder.init` with the key that pretraining draws its
   context encoder from, `split(key(seed), 3)[0]`), never trained; its results say
   'random' and step 0 and go to `probe_random/` by default. It is frozen and called without
   a mask, deterministically, and its patch features get the non-affine LayerNorm (eps 1e-5)
   before every probe.
2. Probes (SPEC §8.2-8.3): linear, cross-attentive, simple- and multi-head attentive, trained
   simultaneously on the same batches with cross-entropy, each with its own AdamW and the
   reference's schedule (SPEC §6.4-6.5; `configs/probe.py`).
3. Training data: `probe_train` (plus `probe_select` under `selection='reference'`, which
   trains on the reference's whole probe set). With `config.augment` each example is one view of
   the pretraining transform (RandomResizedCrop + flip + the run's colour augmentation, SPEC
   §8.1, §10.23) and the backbone runs inside the jitted step under `stop_gradient`. Without
   it, the examples get the eval transform, so their features never change: they are computed
   once and the probes train on the cache. Measured on the tiny digits run (CPU, 63 steps of 16
   per epoch, four probes): 0.9 s per epoch cached vs 2.2 s in-step with augmentation; the
   step alone is 9 ms vs 129 ms (batch 64), the backbone's forward being most of it.
4. Every `eval_every_epochs` epochs (and at the last) all probes are scored on `test` and on
   the selection split; evaluation features are always cached (eval transform, frozen
   backbone: they are the same every epoch).
5. Selection (header items 11, 12): per probe, the epoch whose top-1 on the selection split is
   highest, ties to the later epoch (`'holdout'`: `probe_select`, held out from the probes'
   training data), or the last epoch (`'last'`, and `'holdout'` when `use_probe_select` is
   off). `'reference'` reproduces the paper's protocol: train on the reference's probe set and
   select on the test split with `>=`, so its test numbers are optimistically biased (they are
   reported as such). Each probe is reported at its own epoch; `best` is the attentive probe
   with the highest selection score, ties to the later epoch, then the reference's order
   (multi, cross, simple): under `'reference'` exactly the reference's best-of-three.
6. Output: `WORKDIR/<output_dir>/results.json` (`output_dir` None: 'probe', or 'probe_random'
   for the random encoder) and `metrics.jsonl` (one row per evaluated
   epoch), replaced by each run, plus a k-NN accuracy on mean-pooled features.

Never imports `scott_jax.train` (STYLE.md): a run is read through its checkpoint only.
"""

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax import objectives, optim
from scott_jax.checkpoint import load_config, load_state_tree
from scott_jax.models import Encoder, encoder_from_config
from scott_jax.models.probes import ATTENTIVE_PROBES, build_probes
from scott_jax.sharding import make_mesh, to_global
from scott_jax.writers import MetricWriter

log = logging.getLogger(__name__)

#: Fewer probe optimizer steps than this get a warning (see `run_probes`).
FEW_STEPS = 500

ENCODERS = ("context", "target", "random")
#: Where results go when `config.output_dir` is None, per encoder.
DEFAULT_OUTPUT_DIRS = {"context": "probe", "target": "probe", "random": "probe_random"}
SELECTION_RULES = ("holdout", "last", "reference")
#: The "top-5" of top-5 accuracy; capped at the number of classes.
TOP_K = 5
#: PRNG of the probes' dropout: XLA's RngBitGenerator ('rbg') rather than threefry halves
#: the compile time of the four-probe step on CPU and is cheaper on GPU too. Its bits may
#: differ between device layouts, which the probes do not need (params use the default key).
DROPOUT_PRNG = "rbg"
METRICS = ("top1", "top5", "mpc")


# --------------------------------------------------------------------------- metrics


@functools.partial(jax.jit, static_argnames=("num_classes",))
def classification_counts(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *, num_classes: int
) -> dict[str, jax.Array]:
    """Per-class sums over the real rows of a batch: 'count', 'top1', 'top5', float32 [C] each.

    logits [B, C]; labels int [B]; mask [B] (true = a real example, false = padding, as
    `eval_batches` marks it) or None for all rows. 'count'[c] is the number of examples of class
    c, 'top1'[c] of them whose largest logit is c, 'top5'[c] whose label is among the min(5, C)
    largest logits. Sums rather than means so that batches (and hosts) add up exactly;
    `accuracies` turns them into percentages. Jit-able.
    """
    k = min(TOP_K, num_classes)
    weight = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    _, top = jax.lax.top_k(logits.astype(jnp.float32), k)  # [B, k], best first
    hits = (top == labels[:, None]).astype(jnp.float32)
    per_class = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weight[:, None]  # [B, C]
    return {
        "count": per_class.sum(0),
        "top1": (per_class * hits[:, :1]).sum(0),
        "top5": (per_class * hits.max(-1, keepdims=True)).sum(0),
    }


def accuracies(counts: Mapping[str, jax.Array]) -> dict[str, float]:
    """top1, top5 and mean-per-class accuracy in % from `classification_counts` sums (SPEC §8.4).

    mpc = 100 · mean over **all** C classes of top1_c / count_c, where a class without examples
    counts as 0 (the reference's `MeanPerClassAccuracy`, SPEC §10.14), so it is comparable with
    the paper's numbers even on a split that misses classes.
    """
    count = np.asarray(counts["count"], np.float64)
    total = count.sum()
    if total == 0:
        raise ValueError("no examples to score (every row is padding)")
    top1 = np.asarray(counts["top1"], np.float64)
    per_class = np.divide(top1, count, out=np.zeros_like(top1), where=count > 0)
    return {
        "top1": float(100.0 * top1.sum() / total),
        "top5": float(100.0 * np.asarray(counts["top5"], np.float64).sum() / total),
        "mpc": float(100.0 * per_class.mean()),
    }


def classification_metrics(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *, num_classes: int
) -> dict[str, float]:
    """top1, top5, mpc (%) of one set of logits [B, C]; padding rows (mask false) excluded."""
    return accuracies(classification_counts(logits, labels, mask, num_classes=num_classes))


# --------------------------------------------------------------------------- k-NN


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "temperature", "chunk_size"))
def knn_scores(
    train_features: jax.Array,
    train_labels: jax.Array,
    test_features: jax.Array,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> jax.Array:
    """Class votes [M, C] of a weighted k-NN on cosine similarity (DINO's k-NN classifier).

    train_features [N, D], train_labels int [N], test_features [M, D]. Every test example takes
    its k most cosine-similar training examples (k capped at N) and gives each neighbour's class
    the vote exp(similarity / temperature), so closer neighbours count more than in a majority
    vote (SPEC §8 does not define a k-NN; k = 20, T = 0.07 are DINO's settings). The votes can
    be scored like logits (`classification_counts`). Test rows are processed `chunk_size` at a
    time (`lax.map`), so memory is chunk_size × N similarities, whatever M is: ImageNet-100
    (117k × 5k) takes seconds on one GPU, cheap enough for an online metric.
    """
    train = _l2_normalize(train_features)
    test = _l2_normalize(test_features)
    k = min(k, train.shape[0])
    num_test = test.shape[0]
    chunk_size = min(chunk_size, num_test)
    num_chunks = -(-num_test // chunk_size)
    test = jnp.pad(test, ((0, num_chunks * chunk_size - num_test), (0, 0)))

    def votes(chunk):  # [c, D] -> [c, C]
        similarity = jnp.matmul(chunk, train.T, precision=jax.lax.Precision.HIGHEST)
        top_similarity, index = jax.lax.top_k(similarity, k)  # [c, k]
        neighbours = jax.nn.one_hot(train_labels[index], num_classes, dtype=jnp.float32)
        return jnp.einsum("qk,qkc->qc", jnp.exp(top_similarity / temperature), neighbours)

    chunks = test.reshape(num_chunks, chunk_size, -1)
    return jax.lax.map(votes, chunks).reshape(-1, num_classes)[:num_test]


def knn_accuracy(
    train_features: jax.Array,
    train_labels: jax.Array,
    test_features: jax.Array,
    test_labels: jax.Array,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> jax.Array:
    """Top-1 accuracy (%, a float32 scalar) of the `knn_scores` k-NN; jit-able."""
    scores = knn_scores(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return 100.0 * jnp.mean(jnp.argmax(scores, axis=-1) == test_labels)


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- backbone


class Backbone(NamedTuple):
    """A run's encoder: module, numpy params and where they came from."""

    encoder: Encoder
    params: dict
    which: str  # 'context', 'target' or 'random'
    step: int  # of the checkpoint the params come from; 0 for random
    train_config: dict


def load_backbone(
    workdir: str | os.PathLike,
    *,
    encoder: str = "context",
    step: int | None = None,
    compute_dtype: str | None = None,
) -> Backbone:
    """The `encoder` ('context' or 'target') of a pretraining run at `step` (default: latest).

    `encoder='random'`: the same architecture (from the config saved at `step`) with the run's
    initial weights instead, `encoder.init(split(key(config.seed), 3)[0])` as pretraining
    draws its context encoder at step 0 (`scott_jax.train.create_state`); `step` is then 0.
    Reads `WORKDIR/checkpoints` (config and state) without creating anything. Fails loudly
    (SPEC §10.15): FileNotFoundError when the workdir has no checkpoint, ValueError when the
    saved weights are not exactly (same leaves, shapes and dtypes) those of the encoder that
    the saved config describes; both messages name the workdir and step.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {ENCODERS}")
    directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{workdir} is not a pretraining run: {directory} does not exist (probe.py needs "
            "the --workdir of a launch.py run)"
        )
    tree = load_state_tree(directory, step)
    if "step" not in tree:
        raise ValueError(f"the checkpoint in {directory} has no 'step'; keys: {sorted(tree)}")
    step = int(tree["step"]) if step is None else int(step)
    train_config = load_config(directory, step)
    module = encoder_from_config(train_config, compute_dtype)
    image = jax.ShapeDtypeStruct((1, module.img_size, module.img_size, 3), jnp.float32)
    if encoder == "random":
        params = random_init_params(module, train_config["seed"])
        return Backbone(module, params, encoder, 0, train_config)
    where = f"the {encoder} encoder of step {step} in {directory}"
    keys = ("params", "context_encoder") if encoder == "context" else ("target_params",)
    params = tree
    for key in keys:
        if not isinstance(params, Mapping) or key not in params:
            raise ValueError(
                f"{where}: the checkpoint has no {'/'.join(keys)} (its top-level keys: "
                f"{sorted(tree)})"
            )
        params = params[key]
    expected = jax.eval_shape(module.init, jax.random.key(0), image)["params"]
    _check_params(params, expected, where, train_config)
    return Backbone(module, params, encoder, step, train_config)


def random_init_params(module: Encoder, seed: int) -> dict:
    """Numpy params of `module` as a run with `seed` initialises its context encoder."""
    rng = jax.random.split(jax.random.key(seed), 3)[0]
    image = jnp.zeros((1, module.img_size, module.img_size, 3), jnp.float32)
    return jax.device_get(jax.jit(module.init)(rng, image)["params"])


def _check_params(params, expected, where: str, train_config: Mapping) -> None:
    """ValueError listing every leaf where the saved params and the encoder's init differ."""

    def flat(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in leaves}

    saved, wanted = flat(params), flat(expected)
    problems = []
    if missing := sorted(wanted.keys() - saved.keys()):
        problems.append(f"missing from the checkpoint: {missing}")
    if extra := sorted(saved.keys() - wanted.keys()):
        problems.append(f"in the checkpoint but not in the encoder: {extra}")
    for name in sorted(wanted.keys() & saved.keys()):
        got, want = saved[name], wanted[name]
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            problems.append(
                f"{name}: checkpoint {np.dtype(got.dtype).name}{list(got.shape)}, encoder "
                f"{np.dtype(want.dtype).name}{list(want.shape)}"
            )
    if problems:
        described = {"variant": train_config.get("variant"), **train_config.get("model", {})}
        raise ValueError(
            f"{where} does not match the encoder its saved config describes ({described}):\n  "
            + "\n  ".join(problems)
        )


# --------------------------------------------------------------------------- features


def backbone_features(encoder: Encoder, params, images: jax.Array) -> jax.Array:
    """images [B, S, S, 3] -> frozen, LayerNorm'd patch features [B, N, D] (SPEC §8.1).

    No keep-mask, deterministic (no dropout or drop-path), non-affine LayerNorm over D
    (eps 1e-5) as before every reference probe, and `stop_gradient`: called inside a probe's
    loss, no gradient reaches the backbone.
    """
    return objectives.target_features(encoder.apply({"params": params}, images))


@functools.partial(jax.jit, static_argnames=("encoder", "pool"))
def _features(encoder: Encoder, params, images: jax.Array, pool: bool) -> jax.Array:
    features = backbone_features(encoder, params, images)
    return features.mean(axis=1) if pool else features


def extract_features(
    encoder: Encoder,
    params,
    batches: Iterator[dict[str, np.ndarray]],
    *,
    pool: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features and labels of every real example of `batches`, in order.

    batches: this host's part of each global batch, in `eval_batches`' format ('image'
    [b, S, S, 3], 'label' [b], 'mask' [b], false on padding). Returns numpy arrays on every
    host, padding removed: features [M, D] mean-pooled over the tokens when `pool` (k-NN) or
    [M, N, D] (probe caches), in the encoder's compute dtype, and labels [M]. The batch is
    sharded over `mesh` ('data'; default: all devices) and params are replicated, so the same
    call serves as an online metric in a training loop::

        feats, labels = extract_features(encoder, state.target_params, eval_batches(...))
    """
    mesh = make_mesh() if mesh is None else mesh
    batch_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    chunks = []

    def fetch(pending) -> None:
        """Device -> host with a one-batch lag, so the next batch computes meanwhile."""
        host = multihost_utils.process_allgather(pending, tiled=True)
        chunks.append({k: v[host["mask"]] for k, v in host.items() if k != "mask"})

    pending = None
    for batch in batches:
        batch = to_global(batch, batch_sharding)
        current = {
            "features": _features(encoder, params, batch["image"], pool),
            "label": batch["label"],
            "mask": batch["mask"],
        }
        if pending is not None:
            fetch(pending)
        pending = current
    if pending is None:
        raise ValueError("extract_features got no batches")
    fetch(pending)
    return (
        np.concatenate([c["features"] for c in chunks]),
        np.concatenate([c["label"] for c in chunks]),
    )


# --------------------------------------------------------------------------- probe steps


def init_probe_state(probes: Mapping[str, nn.Module], tx, feature_shape, seed: int) -> dict:
    """{'step': 0, 'probes': {name: {'params', 'opt_state'}}} for features [*, N, D]."""
    features = jnp.zeros((1, *feature_shape[1:]), jnp.float32)
    rngs = jax.random.split(jax.random.key(seed), len(probes))
    states = {}
    for rng, (name, probe) in zip(rngs, probes.items(), strict=True):
        params = probe.init(rng, features)["params"]
        states[name] = {"params": params, "opt_state": tx.init(params)}
    return {"step": jnp.zeros((), jnp.int32), "probes": states}


def probe_train_step(
    state: dict,
    backbone_params,
    batch: Mapping[str, jax.Array],
    *,
    probes: Mapping[str, nn.Module],
    tx: optax.GradientTransformation,
    featurize: Callable,
    seed: int,
) -> tuple[dict, dict[str, jax.Array]]:
    """One update of every probe on the same batch (SPEC §8.1); returns (state, metrics).

    batch: 'x' and 'label' int [B]. `featurize(backbone_params, x)` gives the LayerNorm'd
    features [B, N, D]: `backbone_features` on images (the in-step path, under stop_gradient)
    or the identity on cached features (backbone_params None). Each probe has its own optimizer
    state (one AdamW recipe, separate moments) and dropout drawn from fold_in(seed, step, i)
    (`DROPOUT_PRNG`).
    """
    features = featurize(backbone_params, batch["x"])
    rng = jax.random.fold_in(jax.random.key(seed, impl=DROPOUT_PRNG), state["step"])
    states, metrics = {}, {}
    for i, (name, probe) in enumerate(probes.items()):
        states[name], loss, logits = _update_probe(
            probe, tx, state["probes"][name], features, batch["label"], jax.random.fold_in(rng, i)
        )
        metrics[f"{name}/train/loss"] = loss
        metrics[f"{name}/train/top1"] = 100.0 * jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return {"step": state["step"] + 1, "probes": states}, metrics


def _update_probe(probe, tx, probe_state, features, labels, rng):
    """Cross-entropy (no label smoothing) and one AdamW update of one probe."""

    def loss_fn(params):
        logits = probe.apply({"params": params}, features, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe_state["params"])
    updates, opt_state = tx.update(grads, probe_state["opt_state"], probe_state["params"])
    params = optax.apply_updates(probe_state["params"], updates)
    return {"params": params, "opt_state": opt_state}, loss, logits


def probe_eval_counts(
    state: dict,
    batch: Mapping[str, jax.Array],
    *,
    probes: Mapping[str, nn.Module],
    num_classes: int,
) -> dict[str, dict[str, jax.Array]]:
    """`classification_counts` of every probe (eval mode) on cached features batch['x']."""
    return {
        name: classification_counts(
            probe.apply({"params": state["probes"][name]["params"]}, batch["x"]),
            batch["label"],
            batch["mask"],
            num_classes=num_classes,
        )
        for name, probe in probes.items()
    }


# --------------------------------------------------------------------------- selection


def selection_plan(rule: str, has_select_split: bool) -> tuple[str, str | None]:
    """(rule applied, split whose top-1 ranks the epochs and picks the best probe).

    'holdout' ranks on 'probe_select', or becomes 'last' without one; 'last' still uses
    'probe_select' (if any) to pick the best probe, else the probes' last-epoch training
    top-1; 'reference' ranks on 'test' (the reference's protocol, SPEC §10.11).
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection {rule!r}; expected one of {SELECTION_RULES}")
    if rule == "reference":
        return rule, "test"
    if rule == "holdout" and not has_select_split:
        log.warning("selection='holdout' without a probe_select split: reporting the last epoch")
        return "last", None
    return rule, "probe_select" if has_select_split else None


def select_row(history: Sequence[Mapping], key: str) -> Mapping:
    """The row of `history` with the highest `row[key]`; ties go to the later row (>=)."""
    best = None
    for row in history:
        if best is None or row[key] >= best[key]:
            best = row
    if best is None:
        raise ValueError("no evaluated epoch to select from")
    return best


def summarize(
    history: Sequence[Mapping],
    probes: Sequence[str],
    *,
    rule: str,
    score_split: str | None,
    encoder: str,
) -> dict:
    """{'probes': {name: test top1/top5/mpc at the selected epoch, ...}, 'best': name or None}.

    history: one row per evaluated epoch with 'epoch' and f'{probe}/{split}/{metric}' keys
    (splits 'train', 'test', 'probe_select'). Under 'last' every probe reports the last row;
    otherwise its row is `select_row` on f'{probe}/{score_split}/top1'. Each entry keeps the
    score that chose it ('select_top1', on `score_split`, or the training top-1 when there is
    none). 'best' is the attentive probe with the highest score, ties to the later epoch, then
    the order multi, cross, simple: with rule 'reference' that is exactly the reference's
    best-of-three (SPEC §8.1), the number the paper reports as "attentive".
    """
    score_key = "{}/" + (score_split or "train") + "/top1"
    entries = {}
    for name in probes:
        row = history[-1] if rule == "last" else select_row(history, score_key.format(name))
        entries[name] = {
            **{metric: row[f"{name}/test/{metric}"] for metric in METRICS},
            "epoch": int(row["epoch"]),
            "selection": rule,
            "select_split": score_split,
            "select_top1": row[score_key.format(name)],
            "encoder": encoder,
        }
    attentive = [name for name in ATTENTIVE_PROBES if name in entries]
    best = max(
        attentive,
        key=lambda n: (entries[n]["select_top1"], entries[n]["epoch"], -attentive.index(n)),
        default=None,
    )
    return {"probes": entries, "best": best}


# --------------------------------------------------------------------------- the run


def run_probes(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains and scores the probes on a pretraining run; writes and returns the results.

    See the module docstring for the protocol and `configs/probe.py` for the fields. Returns
    the dict written to `WORKDIR/<output_dir>/results.json`: 'probes' {name: {'top1', 'top5',
    'mpc' (test, %), 'epoch', 'selection', 'select_split', 'select_top1', 'encoder'}}, 'best',
    'knn', 'selection' (rule, split, note), 'features' ('in_step' or 'cached'), 'train_steps'
    (optimizer steps of each probe), 'seconds', 'config' and the 'resolved' run-dependent
    settings.
    """
    workdir = os.fspath(workdir)
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
            raise ValueError(f"{name} {settings[name]} is not divisible by {mesh.size} devices")
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
        "Probing the %s encoder of step %d: %s; %d epochs x %d steps, %s features.",
        backbone.which,
        backbone.step,
        ", ".join(probes),
        config.num_epochs,
        data.steps_per_epoch,
        "in-step (augmented)" if config.augment else "cached",
    )
    train_steps = config.num_epochs * data.steps_per_epoch
    if train_steps < FEW_STEPS:
        log.warning(
            "Only %d probe steps (%d epochs x %d): the reference's 100 epochs assume thousands "
            "of images, and probes on a few labels stay under-trained (on digits with 10 "
            "labels per class, 100 steps gave random features 24%% linear top-1, 1,000 steps "
            "82%%). Raise config.num_epochs; with config.augment=False epochs are cheap.",
            train_steps,
            config.num_epochs,
            data.steps_per_epoch,
        )
    output_dir = os.path.join(workdir, config.output_dir or DEFAULT_OUTPUT_DIRS[backbone.which])
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
        "workdir": os.path.abspath(workdir),
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
            "note": _selection_note(rule, score_split, settings["dataset"]),
        },
        "knn": knn,
        "seconds": {"features": feature_seconds, **seconds},
        "config": config.to_dict(),
        "resolved": settings,
    }
    if jax.process_index() == 0:
        path = os.path.join(output_dir, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
    return results


class TrainData(NamedTuple):
    """The probes' training stream: what the step gets and how it turns it into features."""

    featurize: Callable  # (backbone params, x) -> LayerNorm'd features [B, N, D]
    epoch_batches: Callable[[int], Iterator[dict]]  # epoch (1-based) -> host-local batches
    steps_per_epoch: int


def _train_data(config, settings, encoder: Encoder, source, cache) -> TrainData:
    """Augmented images with in-step features, or shuffled cached features (module doc, 3)."""
    from scott_jax.data import pretrain_batches, steps_per_epoch

    batch_size = settings["batch_size"]
    steps = steps_per_epoch(source.num_examples, batch_size)  # drop_last, as the reference
    if config.augment:
        # One view of the pretraining transform: the stream's context view (SPEC §8.1).
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

        return TrainData(functools.partial(backbone_features, encoder), augmented, steps)

    features, labels = cache
    lo, hi = _local_rows(batch_size)

    def shuffled(epoch):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(labels))
        for index in order[: steps * batch_size].reshape(steps, batch_size)[:, lo:hi]:
            yield {"x": features[index], "label": labels[index]}

    return TrainData(_cached_features, shuffled, steps)


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
    total_steps = config.num_epochs * data.steps_per_epoch
    tx = optim.make_optimizer(
        **optim.config_kwargs(
            config.optim,
            total_steps=total_steps,
            warmup_steps=int(config.optim.lr_warmup_epochs * data.steps_per_epoch),
        )
    )
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
    os.makedirs(output_dir, exist_ok=True)
    writer = None
    if jax.process_index() == 0:
        if os.path.exists(metrics := os.path.join(output_dir, "metrics.jsonl")):
            os.remove(metrics)  # a new probe run replaces the previous one's rows
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
                writer.write(epoch * data.steps_per_epoch, row)
            log.info("epoch %d/%d: %s", epoch, config.num_epochs, _progress(row, probes))
    finally:
        if writer is not None:
            writer.close()
    return history, seconds


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Errors for settings that would otherwise fail late or silently."""
    if config.encoder not in ENCODERS:
        raise ValueError(f"config.encoder must be one of {ENCODERS}, got {config.encoder!r}")
    check_selection_and_schedule(config)
    if config.selection == "reference" and config.labels_per_class is not None:
        raise ValueError(
            "selection='reference' reproduces the paper's full-label protocol; "
            "labels_per_class is for the honest rules"
        )


def check_selection_and_schedule(
    config: ml_collections.ConfigDict, rules: Sequence[str] = SELECTION_RULES
) -> None:
    """The selection rule (one of `rules`), epoch counts and warmup of a labelled run (the
    probes; the supervised baselines, which have no 'reference' rule)."""
    if config.selection not in rules:
        raise ValueError(f"config.selection must be one of {rules}, got {config.selection!r}")
    if config.num_epochs < 1 or config.eval_every_epochs < 1:
        raise ValueError("config.num_epochs and config.eval_every_epochs must be >= 1")
    if not 0 <= config.optim.lr_warmup_epochs <= config.num_epochs:
        raise ValueError(
            f"config.optim.lr_warmup_epochs={config.optim.lr_warmup_epochs} must lie in "
            f"[0, config.num_epochs={config.num_epochs}]"
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
        # The reference's probe set is probe_train + probe_select (SPEC §7.3).
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
    """`extract_features` of a whole source under the eval transform (SPEC §7.2)."""
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


def _selection_note(rule: str, score_split: str | None, dataset: str) -> str:
    if rule == "reference":
        note = (
            "the paper's protocol: epochs and the best probe are chosen on the test split, so "
            "these test numbers are optimistically biased (SPEC §10.11); use them only to "
            "compare with the paper"
        )
        if dataset == "oxford_flowers102":
            note += (
                "; NOTE(deviation): the reference selects Flowers-102 on its validation split "
                "(inside the probes' training data), which no data purpose exposes yet"
            )
        return note
    if score_split is None:
        return "no selection split: every probe is reported at its last epoch"
    return f"epochs chosen on {score_split}, held out from the probes' training data"


# --------------------------------------------------------------------------- table


def format_table(results: Mapping) -> str:
    """The results as a plain-text table (one row per probe, then k-NN and the best probe)."""
    selection = results["selection"]
    lines = [
        f"{results['dataset']}: {results['encoder']} encoder of step {results['checkpoint_step']}"
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
