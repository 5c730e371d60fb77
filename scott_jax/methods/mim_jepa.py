"""MIM-JEPA (paper §3): a context encoder sees the masked view, a predictor fills in the
masked tokens, and the EMA target encoder's LayerNorm'd features of the other view are the
regression targets (Smooth-L1 at the masked tokens). Official code: `src/mimjepa.py`.
"""

import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scott_jax import masking, objectives, optim
from scott_jax.config_checks import Checks
from scott_jax.data import device_augment  # JAX only: imports no TensorFlow
from scott_jax.evaluators.metrics import pooled_std
from scott_jax.methods.base import (
    OnlineProbe,
    Trainer,
    TrainState,
    check_ema_and_monitors,
    host_rows,
    jit_trainer,
    online_knn,
    online_probe,
    pretrain_source,
)
from scott_jax.models import Encoder, Predictor, build_predictor, encoder_from_config
from scott_jax.models.transformer import gather_tokens

NAME = "mim_jepa"
#: Evaluation encoders: name -> path in the train state (the first is probe.py's default,
#: the context encoder, as the official evaluation).
ENCODERS = {"context": ("params", "context_encoder"), "target": ("target_params",)}


def check_config(config: ml_collections.ConfigDict) -> None:
    """MIM-JEPA's own fields, before any data is read or anything compiled."""
    c = Checks(config)
    c.choice("mask.type", masking.MASK_TYPES)
    c.choice("mask.blocks_are", masking.BLOCKS_ARE)
    c.number("mask.ratio", low=0, high=1, low_open=True, high_open=True)
    c.number("predictor.depth", low=1, integer=True)
    if config.data.aug == "moca":
        c.fail("config.data.aug='moca' makes MOCA's two unaligned crops; this method needs one")
    check_ema_and_monitors(c)
    c.done()


def build_encoder(config: Mapping, compute_dtype: str | None = None) -> Encoder:
    """The SCOTT / ViT encoder of a run config (ConfigDict or the dict saved with it)."""
    return encoder_from_config(config, compute_dtype)


def build_models(config: ml_collections.ConfigDict) -> tuple[Encoder, Predictor]:
    """(encoder, predictor) from `config.variant`, `config.model.*` and `config.predictor`."""
    encoder = build_encoder(config)
    predictor = build_predictor(
        encoder, depth=config.predictor.depth, double_rescale=config.predictor.double_rescale
    )
    return encoder, predictor


def train_source(config: ml_collections.ConfigDict):
    return pretrain_source(config)


# --------------------------------------------------------------------------- state and step


def create_train_state(rng, *, config, encoder, predictor, tx, probe: OnlineProbe | None):
    """Fresh state: the target encoder starts as a copy of the context encoder."""
    encoder_rng, predictor_rng, probe_rng = jax.random.split(rng, 3)
    images = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    context_params = encoder.init(encoder_rng, images)["params"]
    features = jnp.zeros((1, encoder.num_patches, encoder.embed_dim), jnp.float32)
    params = {
        "context_encoder": context_params,
        "predictor": predictor.init(predictor_rng, features)["params"],
    }
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=jax.tree.map(jnp.copy, context_params),
        opt_state=tx.init(params),
        probe=None if probe is None else probe.init(probe_rng, *features.shape[1:]),
    )


def train_step(
    state: TrainState,
    batch: dict,
    *,
    encoder: Encoder,
    predictor: Predictor,
    tx: optax.GradientTransformation,
    schedules,
    seed: int,
    aug: str = "none",
    probe: OnlineProbe | None = None,
    num_kept: int | None = None,
):
    """One MIM-JEPA update; returns (new state, metrics of this step).

    batch: 'context', 'target' [B, S, S, 3] (two views of the same crop), or instead 'view'
    [B, S, S, 3] uint8 (`config.data.color_on_device`: the crop, coloured here with `aug`),
    'keep_mask' [B, N] (1 = visible), and 'label' [B] when the online probe is on. Randomness
    is `fold_in(seed, step)`, so a resumed run draws the same dropout and colours as an
    uninterrupted one. `num_kept` (static) says every mask row keeps exactly that many
    tokens, as `masking`'s masks do: the SCOTT stem then skips the masked patches'
    convolutions and the predictor's last block and head run only at the masked tokens, all
    the loss reads (same loss and gradients). A row keeping another number makes the loss
    NaN, which stops training, never silently wrong.
    """
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if "view" in batch:  # colour and normalise both views on the accelerator
        context_view, target_view = device_augment.two_views(
            batch["view"], jax.random.fold_in(rng, 2), aug
        )
        batch = {**batch, "context": context_view, "target": target_view}
    keep_mask = batch["keep_mask"]
    # Targets: the EMA target encoder on the unmasked target view, LN'd, no gradient.
    targets = objectives.target_features(
        encoder.apply({"params": state.target_params}, batch["target"])
    )

    def loss_fn(params):
        # The context encoder on the masked context view, then the predictor, train mode.
        enc_rng, pred_rng = jax.random.split(rng)
        context = encoder.apply(
            {"params": params["context_encoder"]},
            batch["context"],
            keep_mask,
            train=True,
            max_kept=num_kept,
            rngs=dict(zip(("dropout", "drop_path"), jax.random.split(enc_rng), strict=True)),
        )
        predict = functools.partial(
            predictor.apply,
            {"params": params["predictor"]},
            context,
            train=True,
            rngs=dict(zip(("dropout", "drop_path"), jax.random.split(pred_rng), strict=True)),
        )
        if num_kept is None:
            loss = objectives.masked_smooth_l1(predict(), targets, keep_mask)
        else:
            num_tokens = keep_mask.shape[1]
            queries, exact = objectives.masked_tokens(keep_mask, num_tokens - num_kept)
            loss = objectives.smooth_l1_at_masked(
                predict(queries=queries), gather_tokens(targets, queries), num_tokens
            )
            loss = jnp.where(exact.all(), loss, jnp.nan)
        return loss, pooled_std(objectives.target_features(context))

    # Loss, gradients, AdamW with the scheduled LR / WD.
    (loss, context_std), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA of the context encoder into the target encoder, momentum m(k).
    values = schedules(state.step)
    target_params = optim.ema_update(state.target_params, params["context_encoder"], values["ema"])
    metrics = {
        "loss": loss,
        **values,
        "grad_norm/tokenizer": optax.tree.norm(grads["context_encoder"]["tokenizer"]),
        "grad_norm/transformer": optax.tree.norm(grads["context_encoder"]["transformer"]),
        "grad_norm/predictor": optax.tree.norm(grads["predictor"]),
        "target_std": pooled_std(targets),
        "context_std": context_std,
    }
    probe_state = state.probe
    if probe is not None:
        probe_state, probe_metrics = probe.update(
            state.probe, targets, batch["label"], jax.random.fold_in(rng, 1)
        )
        metrics.update(probe_metrics)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        target_params=target_params,
        opt_state=opt_state,
        probe=probe_state,
    )
    return new_state, metrics


# --------------------------------------------------------------------------- input and trainer


def masked_batches(batches: Iterator[dict], config, grid: int, start_step: int) -> Iterator[dict]:
    """Adds the step's keep-masks [b, N] to each host-local batch (a pure function of the step;
    this host's rows of the global batch's masks)."""
    for step, batch in enumerate(batches, start=start_step):
        mask = host_rows(
            lambda n, step=step: masking.keep_masks(
                config.seed,
                step,
                n,
                grid,
                config.mask.ratio,
                mask_type=config.mask.type,
                blocks_are=config.mask.blocks_are,
            ),
            batch["label"].shape[0],
        )
        yield {**batch, "keep_mask": mask.astype(np.int32)}


def build_trainer(
    config: ml_collections.ConfigDict, lengths: optim.RunLengths, mesh: jax.sharding.Mesh, source
) -> Trainer:
    """Models, AdamW and schedules (EMA linear, as the official config), jitted over `mesh`;
    the online probe (`config.online_probe`) and k-NN (`config.knn_every_epochs`)."""
    encoder, predictor = build_models(config)
    optimizer = optim.make(config.optim, lengths, ema_kind="linear")
    probe = online_probe(config, source, optimizer)
    init = functools.partial(
        create_train_state,
        config=config,
        encoder=encoder,
        predictor=predictor,
        tx=optimizer.tx,
        probe=probe,
    )
    step = functools.partial(
        train_step,
        encoder=encoder,
        predictor=predictor,
        tx=optimizer.tx,
        schedules=optimizer.schedules,
        seed=config.seed,
        aug=config.data.aug,
        probe=probe,
        num_kept=masking.num_kept(encoder.num_patches, config.mask.ratio),
    )

    def add_masks(batches: Iterator[dict], start_step: int) -> Iterator[dict]:
        return masked_batches(batches, config, encoder.grid_size, start_step)

    evaluators = online_knn(config, encoder, ENCODERS, lengths, mesh)
    return jit_trainer(
        mesh, init, step, add_masks=add_masks, evaluators=evaluators, colours_views=True
    )
