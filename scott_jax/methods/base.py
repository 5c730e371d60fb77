"""What the loop gets from a method (`Trainer`) and the pieces the methods share: the
self-supervised train state, the online monitoring probe, the jit wiring over the mesh."""

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax import optim
from scott_jax.config_checks import Checks
from scott_jax.evaluators import Evaluator
from scott_jax.evaluators.knn import knn_evaluator
from scott_jax.evaluators.probe_steps import update_probe
from scott_jax.models.probes import SimpleAttentiveProbe


class Trainer(NamedTuple):
    """A method's run on a mesh, as the loop drives it.

    init: rng -> state, jitted (state replicated). step: (state, global batch) -> (state,
    metrics), jitted, the state donated, the batch sharded over 'data'; metrics must hold
    'loss'. add_masks: (host-local data batches from `start_step`, start_step) -> step
    batches, run in the input thread (masks are pure functions of the step). evaluators: run
    every `every_steps` and at the end. progress_keys: the metrics shown in the progress line.
    finish: (workdir, step) -> the results of a finished run, or None. colours_views: the
    step also takes one uint8 crop, 'view', and makes and colours both views itself
    (`config.data.color_on_device`, on by default on accelerators).
    """

    init: Callable
    step: Callable
    data_sharding: NamedSharding
    add_masks: Callable[[Iterator[dict], int], Iterator[dict]]
    evaluators: tuple[Evaluator, ...] = ()
    progress_keys: tuple[str, ...] = ("loss", "lr")
    finish: Callable[[str, int], dict] | None = None
    colours_views: bool = False


def all_finite(tree: Any) -> jax.Array:
    """float32 scalar, 1 when every floating-point leaf of `tree` is finite, else 0."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])).astype(jnp.float32)


def with_state_check(step: Callable) -> Callable:
    """`step` that also reports 'state_finite': whether the new state (parameters, optimizer
    state, EMA target) is all finite, one reduction inside the step. The loss can still be
    finite when the update already is not; the loop never saves such a state."""

    def checked(state, batch):
        state, metrics = step(state, batch)
        return state, {**metrics, "state_finite": all_finite(state)}

    return checked


def jit_trainer(mesh: jax.sharding.Mesh, init: Callable, step: Callable, **fields) -> Trainer:
    """Jits `init(rng)` and `step(state, batch)` over `mesh`: the state replicated and
    donated, the batch sharded over 'data', the metrics with 'state_finite'
    (`with_state_check`). `fields`: the other `Trainer` fields."""
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    return Trainer(
        init=jax.jit(init, out_shardings=replicated),
        step=jax.jit(
            with_state_check(step),
            in_shardings=(replicated, data_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        ),
        data_sharding=data_sharding,
        **fields,
    )


def host_rows(draw: Callable[[int], Any], local_batch: int) -> Any:
    """This host's rows of a per-step draw (masks) for the whole global batch: `draw(n)` ->
    arrays with n rows, drawn for all `local_batch * process_count` rows as one process
    would, so N hosts train exactly as one (and batch-level choices, such as a common
    context length, agree across hosts)."""
    index = jax.process_index()
    full = draw(local_batch * jax.process_count())
    return jax.tree.map(lambda x: x[index * local_batch : (index + 1) * local_batch], full)


def pick(tree: Any, path: tuple[str, ...]) -> Any:
    """The subtree at `path` (a method's `ENCODERS` entry) of a state dataclass or dict."""
    for key in path:
        tree = tree[key] if isinstance(tree, Mapping) else getattr(tree, key)
    return tree


# --------------------------------------------------------------------------- self-supervised


@flax.struct.dataclass
class TrainState:
    """The state of the EMA-target methods; a pytree of arrays (replicated over the mesh).

    params: {'context_encoder', 'predictor'}, trained by `opt_state`'s AdamW.
    target_params: the EMA target encoder (the context encoder's tree).
    probe: {'params', 'opt_state'} of the online monitoring probe, or None when it is off.
    """

    step: jax.Array
    params: dict
    target_params: dict
    opt_state: optax.OptState
    probe: dict | None = None


def check_ema_and_monitors(checks: Checks) -> None:
    """The EMA momenta and the online monitors of the EMA-target methods."""
    for name in ("ema_start", "ema_final"):
        checks.number(f"optim.{name}", low=0, high=1)
    checks.number("knn_every_epochs", low=0)
    checks.choice("online_probe", (False, True))


def pretrain_source(config: ml_collections.ConfigDict):
    """The pretraining split of `config.data`; the online probe needs its labels."""
    from scott_jax.data import load_source  # TensorFlow only where data is read

    source = load_source(
        config.data.name,
        "pretrain",
        data_dir=config.data.data_dir,
        pretrain_split=config.data.pretrain_split,
    )
    if config.online_probe and source.num_classes < 2:
        raise ValueError(f"online_probe needs class labels, and {config.data.name!r} has none")
    return source


class OnlineProbe(NamedTuple):
    """The monitoring probe trained on the detached target features during pretraining (the
    official code's `SimpleAttentiveProbe` on the LN'd target encoder output)."""

    module: SimpleAttentiveProbe
    tx: optax.GradientTransformation

    def init(self, rng: jax.Array, num_patches: int, embed_dim: int) -> dict:
        features = jnp.zeros((1, num_patches, embed_dim), jnp.float32)
        params = self.module.init(rng, features)["params"]
        return {"params": params, "opt_state": self.tx.init(params)}

    def update(self, state: dict, features, labels, rng) -> tuple[dict, dict]:
        """One step on features [B, N, D], labels [B]: (new state, probe metrics)."""
        state, loss, logits = update_probe(self.module, self.tx, state, features, labels, rng)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return state, {"probe/loss": loss, "probe/train_top1": accuracy}


def online_probe(
    config: ml_collections.ConfigDict, source, optimizer: optim.Optimizer
) -> OnlineProbe | None:
    """The online probe (`config.online_probe`) with the run's optimizer recipe, or None."""
    if not config.online_probe:
        return None
    return OnlineProbe(SimpleAttentiveProbe(source.num_classes), optimizer.tx)


def online_knn(
    config: ml_collections.ConfigDict,
    encoder,
    encoders: Mapping[str, tuple[str, ...]],
    lengths: optim.RunLengths,
    mesh: jax.sharding.Mesh,
) -> tuple[Evaluator, ...]:
    """The online k-NN (`config.knn_every_epochs`) of the state's `encoders` (a method's
    `ENCODERS`: name -> path), as a `Trainer.evaluators` tuple; () when it is off."""
    knn = knn_evaluator(
        config,
        encoder,
        lambda state: {name: pick(state, path) for name, path in encoders.items()},
        lengths.steps_per_epoch,
        mesh,
    )
    return () if knn is None else (knn,)
