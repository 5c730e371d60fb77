"""Weighted k-NN on cosine similarity (DINO's k-NN classifier) and the training loop's online
k-NN monitor of a run's encoders."""

import functools
import logging
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from scott_jax.errors import ConfigError
from scott_jax.evaluators import Evaluator
from scott_jax.evaluators.features import extract_features

log = logging.getLogger(__name__)


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
    vote (the official evaluation has no k-NN; k = 20, T = 0.07 are DINO's settings). The votes can
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


def knn_sources(data_config: Mapping) -> tuple:
    """(probe_train, test) sources of a run's dataset for the online k-NN; an unlabeled
    dataset is an error here, before any training step."""
    from scott_jax.data import load_source  # TensorFlow only where data is read

    try:
        return tuple(
            load_source(data_config["name"], purpose, data_dir=data_config["data_dir"])
            for purpose in ("probe_train", "test")
        )
    except ValueError as e:
        raise ConfigError(
            f"config.knn_every_epochs needs labeled data (or set it to 0): {e}"
        ) from e


def online_knn(
    encoder, encoders: Mapping[str, dict], sources, *, batch_size: int, mesh
) -> dict[str, float]:
    """`knn/<name>_top1` (%, cosine, k=20, T=0.07) of each encoder's mean-pooled, LN'd
    features of the eval-transform `probe_train` -> `test` images."""
    from scott_jax.data import eval_batches

    row = {}
    for name, params in encoders.items():
        (train_x, train_y), (test_x, test_y) = (
            extract_features(
                encoder,
                params,
                eval_batches(
                    source,
                    batch_size=batch_size,
                    img_size=encoder.img_size,
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
    log.info("k-NN top-1: %s", ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    return row


def knn_evaluator(
    config: ml_collections.ConfigDict,
    encoder,
    encoders_of: Callable[[object], Mapping[str, dict]],
    steps_per_epoch: int,
    mesh,
) -> Evaluator | None:
    """The online k-NN every `config.knn_every_epochs` epochs (None when that is 0).

    `encoders_of(state)` gives the method's evaluation encoders {name: params}; their
    labelled data is loaded here, so a dataset without labels fails before training.
    """
    if not config.knn_every_epochs:
        return None
    every_steps = int(config.knn_every_epochs * steps_per_epoch)
    if every_steps < 1:
        raise ConfigError(
            f"config.knn_every_epochs={config.knn_every_epochs} is less than one step "
            f"({steps_per_epoch} steps per epoch); raise it or set it to 0 (off)"
        )
    sources = knn_sources(config.data)

    def run(state, step: int) -> dict[str, float]:
        del step
        return online_knn(
            encoder, encoders_of(state), sources, batch_size=config.batch_size, mesh=mesh
        )

    return Evaluator(every_steps, run)
