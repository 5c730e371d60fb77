"""Frozen features of an encoder: LayerNorm'd patch features, as every probe sees them, and
their extraction over a whole split on the data mesh."""

import functools
from collections.abc import Iterator

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax import objectives
from scott_jax.sharding import make_mesh, to_global


def backbone_features(encoder: nn.Module, params, images: jax.Array) -> jax.Array:
    """images [B, S, S, 3] -> frozen, LayerNorm'd patch features [B, N, D] (official `src/eval.py`).

    No keep-mask, deterministic (no dropout or drop-path), non-affine LayerNorm over D
    (eps 1e-5) as before every reference probe, and `stop_gradient`: called inside a probe's
    loss, no gradient reaches the backbone.
    """
    return objectives.target_features(encoder.apply({"params": params}, images))


@functools.partial(jax.jit, static_argnames=("encoder", "pool"))
def _features(encoder: nn.Module, params, images: jax.Array, pool: bool) -> jax.Array:
    features = backbone_features(encoder, params, images)
    return features.mean(axis=1) if pool else features


def extract_features(
    encoder: nn.Module,
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
