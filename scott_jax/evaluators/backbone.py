"""A run's evaluation encoder, rebuilt from the config saved with its checkpoint and loaded
with that checkpoint's weights (never a random backbone by accident)."""

import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from scott_jax import methods, storage
from scott_jax.checkpoint import load_config, load_state_tree
from scott_jax.errors import CheckpointError, ConfigError, MissingCheckpointError

#: The random-init baseline: the run's architecture with its step-0 weights.
RANDOM = "random"


class Backbone(NamedTuple):
    """A run's encoder: module, numpy params and where they came from."""

    encoder: nn.Module
    params: dict
    which: str  # a key of the method's ENCODERS, or 'random'
    step: int  # of the checkpoint the params come from; 0 for random
    train_config: dict


def load_backbone(
    workdir: str | os.PathLike,
    *,
    encoder: str | None = None,
    step: int | None = None,
    compute_dtype: str | None = None,
) -> Backbone:
    """An evaluation encoder of a run at `step` (default: latest) and its frozen weights.

    `encoder` is one of the run's method's `ENCODERS` (MIM-JEPA, I-JEPA: 'context' or the EMA
    'target'; None: the method's default, its first), or 'random': the same architecture with
    the run's initial weights, `encoder.init(split(key(config.seed), 3)[0])` as the methods
    draw their context encoder at step 0; `step` is then 0. The architecture comes from the
    config saved with the checkpoint, built by the method's `build_encoder`. Reads
    `WORKDIR/checkpoints` without creating anything and fails loudly, never with a random
    backbone: FileNotFoundError when the workdir has no checkpoint, ValueError when the saved
    weights are not exactly (same leaves, shapes and dtypes) those of that encoder; both
    messages name the workdir and step.
    """
    storage.check(workdir, "--workdir")
    directory = storage.join(workdir, "checkpoints")
    if not storage.is_dir(directory):
        raise MissingCheckpointError(
            f"{workdir} is not a pretraining run: {directory} does not exist (probe.py needs "
            "the --workdir of a launch.py run)"
        )
    tree = load_state_tree(directory, step)
    if "step" not in tree:
        raise CheckpointError(f"the checkpoint in {directory} has no 'step'; keys: {sorted(tree)}")
    step = int(tree["step"]) if step is None else int(step)
    train_config = load_config(directory, step)
    method = methods.of(train_config)
    encoder = encoder or next(iter(method.ENCODERS))
    if encoder != RANDOM and encoder not in method.ENCODERS:
        raise ConfigError(
            f"a {method.NAME} run has no {encoder!r} encoder; choose one of "
            f"{[*method.ENCODERS, RANDOM]}"
        )
    module = method.build_encoder(train_config, compute_dtype)
    image = jax.ShapeDtypeStruct((1, module.img_size, module.img_size, 3), jnp.float32)
    if encoder == RANDOM:
        params = random_init_params(module, train_config["seed"])
        return Backbone(module, params, encoder, 0, train_config)
    where = f"the {encoder} encoder of step {step} in {directory}"
    keys = method.ENCODERS[encoder]
    params = tree
    for key in keys:
        if not isinstance(params, Mapping) or key not in params:
            raise CheckpointError(
                f"{where}: the checkpoint has no {'/'.join(keys)} (its top-level keys: "
                f"{sorted(tree)})"
            )
        params = params[key]
    expected = jax.eval_shape(module.init, jax.random.key(0), image)["params"]
    _check_params(params, expected, where, train_config)
    return Backbone(module, params, encoder, step, train_config)


def random_init_params(module: nn.Module, seed: int) -> dict:
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
        raise CheckpointError(
            f"{where} does not match the encoder its saved config describes ({described}):\n  "
            + "\n  ".join(problems)
        )
