"""The probes' jitted pieces: state, one update of every probe on a batch of frozen
features, and their evaluation counts. Shared by `probe.py` and the online probe of the
pretraining methods."""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from scott_jax.evaluators.metrics import classification_counts

#: PRNG of the probes' dropout: XLA's RngBitGenerator ('rbg') rather than threefry halves
#: the compile time of the four-probe step on CPU and is cheaper on GPU too. Its bits may
#: differ between device layouts, which the probes do not need (params use the default key).
DROPOUT_PRNG = "rbg"


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
    """One update of every probe on the same batch (official `src/eval.py`): (state, metrics).

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
        states[name], loss, logits = update_probe(
            probe, tx, state["probes"][name], features, batch["label"], jax.random.fold_in(rng, i)
        )
        metrics[f"{name}/train/loss"] = loss
        metrics[f"{name}/train/top1"] = 100.0 * jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return {"step": state["step"] + 1, "probes": states}, metrics


def update_probe(probe, tx, probe_state, features, labels, rng):
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
