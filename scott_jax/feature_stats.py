"""Diagnostics of a run's frozen features: is the image information gone, or only small?

    python -m scott_jax.feature_stats --workdir runs/digits_mim --encoder target
    python -m scott_jax.feature_stats --workdir runs/digits_mim --encoder random

When probes on a pretrained encoder lose to random init (docs/results.md, "Evidence on
digits"), these
numbers tell a collapse (the information is gone) from a small signal next to a large shared
component (it is there, but probes on LayerNorm'd features do not reach it). On the
mean-pooled, LayerNorm'd features of the eval-transform `probe_train` images (the k-NN's):

- effective_rank: exp of the entropy of the PCA spectrum (1 = one direction; collapse);
- mean_cosine: mean cosine similarity between different images (1 = all alike);
- pooled_std: `evaluators.metrics.pooled_std`, the training monitor, on these features;
- logistic regression (scikit-learn, L2, to convergence) trained on `labels_per_class`
  examples per class (the probes' subset) and scored on test, on the raw features and on
  features standardised per dimension with the training subset's mean and std.

Prints one JSON line.
"""

import argparse
import json
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def effective_rank(features: np.ndarray) -> float:
    """exp(entropy) of the normalised eigenvalues of the covariance of features [M, D]."""
    centred = features - features.mean(axis=0)
    eigenvalues = np.linalg.svd(centred.astype(np.float64), compute_uv=False) ** 2
    p = eigenvalues / eigenvalues.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def mean_cosine(features: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of different rows of features [M, D]."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    total = unit.sum(axis=0)
    m = len(unit)
    return float((total @ total - m) / (m * (m - 1)))


def logistic_accuracy(train_x, train_y, test_x, test_y, standardise: bool) -> float:
    """Top-1 % of an L2 logistic regression fitted to convergence on (train_x, train_y)."""
    from sklearn.linear_model import LogisticRegression

    if standardise:
        mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    model = LogisticRegression(max_iter=5000).fit(train_x, train_y)
    return 100.0 * float(model.score(test_x, test_y))


def feature_stats(
    workdir: str, encoder: str | None = None, step: int | None = None, labels_per_class: int = 10
) -> dict:
    """The module docstring's numbers for one encoder of a run (see `load_backbone`)."""
    from scott_jax.data import eval_batches, load_source
    from scott_jax.evaluators.backbone import load_backbone
    from scott_jax.evaluators.features import extract_features
    from scott_jax.evaluators.metrics import pooled_std
    from scott_jax.storage import resolve

    backbone = load_backbone(workdir, encoder=encoder, step=step)
    name = backbone.train_config["data"]["name"]
    data_dir = backbone.train_config["data"].get("data_dir")
    batch_size, img_size = backbone.train_config["batch_size"], backbone.encoder.img_size

    def features(source):
        batches = eval_batches(source, batch_size=batch_size, img_size=img_size)
        x, y = extract_features(backbone.encoder, backbone.params, batches)
        return np.asarray(x, np.float32), np.asarray(y)

    pooled, _ = features(load_source(name, "probe_train", data_dir=data_dir))
    subset = load_source(name, "probe_train", data_dir=data_dir, labels_per_class=labels_per_class)
    (train_x, train_y), (test_x, test_y) = (
        features(subset),
        features(load_source(name, "test", data_dir=data_dir)),
    )
    return {
        "workdir": resolve(workdir),
        "encoder": backbone.which,
        "step": backbone.step,
        "effective_rank": effective_rank(pooled),
        "mean_cosine": mean_cosine(pooled),
        "pooled_std": float(pooled_std(pooled[:, None, :])),
        "labels_per_class": labels_per_class,
        "logreg_top1": logistic_accuracy(train_x, train_y, test_x, test_y, standardise=False),
        "logreg_standardised_top1": logistic_accuracy(
            train_x, train_y, test_x, test_y, standardise=True
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a launch.py pretraining run")
    parser.add_argument(
        "--encoder", default=None, help="the method's default, context, target or random"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--labels-per-class", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(feature_stats(args.workdir, args.encoder, args.step, args.labels_per_class)))


if __name__ == "__main__":
    main()
