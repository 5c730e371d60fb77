"""Classification metrics (top-1, top-5, mean-per-class accuracy) from per-class counts that
add up exactly over batches and hosts, and the collapse monitor `pooled_std`."""

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

#: The "top-5" of top-5 accuracy; capped at the number of classes.
TOP_K = 5


METRICS = ("top1", "top5", "mpc")


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
    """top1, top5 and mean-per-class accuracy in % from `classification_counts` sums (official
    `src/metrics.py`).

    mpc = 100 · mean over **all** C classes of top1_c / count_c, where a class without examples
    counts as 0 (the reference's `MeanPerClassAccuracy`), so it is comparable with
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


def pooled_std(features: jax.Array) -> jax.Array:
    """Collapse monitor: channel-mean of the batch std of mean-pooled features [B, N, D].

    Near 0 means every image maps to the same representation (JEPA collapse). The training
    steps log it for the target features ('target_std') and the context encoder's output
    ('context_std'); the latter also moves with the keep-mask and dropout, so read it next to
    the online k-NN (`knn/context_top1`), which needs labels but cannot be fooled that way.
    """
    return features.mean(axis=1).std(axis=0).mean()
