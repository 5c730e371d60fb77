"""I-JEPA (SPEC §9) as a method of the train loop: models, state, step and mask stream.

`config.method = 'ijepa'` makes `scott_jax.train.build_trainer` return `build_trainer`'s
Trainer; the loop, checkpoints, metrics, multi-device sharding and the probe script are
the ones MIM-JEPA uses. The state is the same `TrainState`: params {'context_encoder',
'predictor'}, the EMA `target_params` (the encoder's tree) and the optimizer state, so
`probe.py` loads either encoder of an I-JEPA run as it does for MIM-JEPA.

One step (SPEC §9.4): the target encoder sees the whole image; its output (with its own
final LN) is layer-normalised without affine parameters and gathered at each target
block. The context encoder sees only the context tokens, and the predictor predicts each
block from them. Smooth-L1 (or L2) over the valid target tokens, AdamW, then the EMA.
Both encoders see the same image: the data stream's 'context' view (its 'target' view is
dropped; with `data.aug='none'` the two are identical anyway).
"""

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import optax

from scott_jax import objectives, optim, train
from scott_jax.masking_multiblock import MultiBlockSpec, check_spec, multiblock_masks
from scott_jax.models import encoder_from_config
from scott_jax.models.ijepa import Encoder, Predictor
from scott_jax.models.transformer import gather_tokens

MASK_KEYS = ("context_idx", "context_valid", "target_idx", "target_valid")


def build_models(config: ml_collections.ConfigDict) -> tuple[Encoder, Predictor]:
    """(encoder, predictor): the encoder of `encoder_from_config`, the predictor from
    `config.ijepa` (width `predictor_dim`, `predictor_depth` blocks, `predictor_heads` or
    the encoder's heads, the encoder's MLP ratio, as the paper)."""
    encoder = encoder_from_config(config)
    c = config.ijepa
    heads = c.predictor_heads or encoder.num_heads
    if c.predictor_dim % heads or c.predictor_dim % 4:
        raise ValueError(
            f"config.ijepa.predictor_dim={c.predictor_dim} must be divisible by the {heads} "
            "predictor heads and by 4 (the sin-cos position embedding)"
        )
    predictor = Predictor(
        grid_size=encoder.grid_size,
        embed_dim=c.predictor_dim,
        depth=c.predictor_depth,
        num_heads=heads,
        mlp_ratio=encoder.mlp_ratio,
        drop_path_rate=c.drop_path_rate,
        depth_rescale_init=c.depth_rescale_init,
        dtype=encoder.dtype,
    )
    return encoder, predictor


def create_train_state(rng, *, config, encoder, predictor, spec, tx, probe=None, probe_tx=None):
    """Fresh state: target encoder = copy of the context encoder (SPEC §9.4)."""
    encoder_rng, predictor_rng, probe_rng = jax.random.split(rng, 3)
    images = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    context_params = encoder.init(encoder_rng, images)["params"]
    masks = multiblock_masks(spec, config.seed, 0, 1)
    context_length = masks["context_idx"].shape[1]
    context = jnp.zeros((1, context_length, encoder.embed_dim), jnp.float32)
    params = {
        "context_encoder": context_params,
        "predictor": predictor.init(predictor_rng, context, *(masks[k] for k in MASK_KEYS))[
            "params"
        ],
    }
    probe_state = None
    if probe is not None:
        features = jnp.zeros((1, encoder.num_patches, encoder.embed_dim), jnp.float32)
        probe_params = probe.init(probe_rng, features)["params"]
        probe_state = {"params": probe_params, "opt_state": probe_tx.init(probe_params)}
    return train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=jax.tree.map(jnp.copy, context_params),
        opt_state=tx.init(params),
        probe=probe_state,
    )


def train_step(
    state: train.TrainState,
    batch: dict,
    *,
    encoder: Encoder,
    predictor: Predictor,
    tx,
    schedules,
    seed: int,
    loss: str = "smooth_l1",
    probe=None,
    probe_tx=None,
):
    """One I-JEPA update; returns (new state, metrics of this step).

    batch: 'image' [B, S, S, 3], the multi-block masks (`MASK_KEYS`, shapes in
    scott_jax.masking_multiblock), and 'label' [B] when the online probe is on. Drop path
    draws from `fold_in(seed, step)`, so a resumed run equals an uninterrupted one.
    """
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    context_idx, context_valid = batch["context_idx"], batch["context_valid"]
    target_idx, target_valid = batch["target_idx"], batch["target_valid"]
    # Targets: the EMA encoder on the full image, non-affine LN, gathered per block.
    features = objectives.target_features(
        encoder.apply({"params": state.target_params}, batch["image"])
    )
    targets = gather_tokens(features, target_idx)  # [B, M, Kt, D]

    def loss_fn(params):
        enc_rng, pred_rng = jax.random.split(rng)
        context = encoder.apply(
            {"params": params["context_encoder"]},
            batch["image"],
            context_idx,
            context_valid,
            train=True,
            rngs={"drop_path": enc_rng},
        )
        predicted = predictor.apply(
            {"params": params["predictor"]},
            context,
            context_idx,
            context_valid,
            target_idx,
            target_valid,
            train=True,
            rngs={"drop_path": pred_rng},
        )
        return objectives.block_regression_loss(predicted, targets, target_valid, loss)

    value, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    values = schedules(state.step)
    target_params = optim.ema_update(state.target_params, params["context_encoder"], values["ema"])
    metrics = {
        "loss": value,
        **values,
        "grad_norm/tokenizer": optax.tree.norm(grads["context_encoder"]["tokenizer"]),
        "grad_norm/transformer": optax.tree.norm(grads["context_encoder"]["transformer"]),
        "grad_norm/predictor": optax.tree.norm(grads["predictor"]),
        "target_std": train.pooled_std(features),
        "context_tokens": context_valid.sum(-1).mean(dtype=jnp.float32),
        "target_tokens": target_valid[:, 0].sum(-1).mean(dtype=jnp.float32),
    }
    probe_state = state.probe
    if probe is not None:
        probe_state, probe_metrics = train._probe_update(
            state.probe, features, batch["label"], probe, probe_tx, jax.random.fold_in(rng, 1)
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


def masked_batches(
    batches: Iterator[dict], spec: MultiBlockSpec, seed: int, start_step: int
) -> Iterator[dict]:
    """Data batches -> step batches: 'image' (the 'context' view), 'label', and the step's
    multi-block masks, a pure function of (seed, step, process index)."""
    for step, batch in enumerate(batches, start=start_step):
        masks = multiblock_masks(
            spec, seed, step, batch["context"].shape[0], process_index=jax.process_index()
        )
        yield {"image": batch["context"], "label": batch["label"], **masks}


def build_trainer(
    config: ml_collections.ConfigDict,
    lengths: dict[str, int],
    mesh: jax.sharding.Mesh,
    *,
    num_classes: int | None = None,
) -> train.Trainer:
    """I-JEPA's `train.Trainer`: the `config.ijepa` WD and EMA schedules, static mask shapes."""
    if config.data.color_on_device:
        raise ValueError(
            "config.data.color_on_device is for MIM-JEPA's two views; I-JEPA reads one view "
            "(the recipe has no colour augmentation): set it to False"
        )
    encoder, predictor = build_models(config)
    spec = MultiBlockSpec.from_config(config, encoder.grid_size)
    check_spec(spec)  # fail here, not in the input thread
    if config.ijepa.loss not in objectives.IJEPA_LOSSES:
        raise ValueError(
            f"unknown config.ijepa.loss {config.ijepa.loss!r}; expected one of "
            f"{objectives.IJEPA_LOSSES}"
        )
    opt_kwargs = {**train.optimizer_kwargs(config, lengths), "wd_kind": config.ijepa.wd_schedule}
    tx = optim.make_optimizer(**opt_kwargs)
    probe, probe_tx = train.make_probe(num_classes, opt_kwargs)
    schedules = train.make_schedules(
        {k: v for k, v in opt_kwargs.items() if k != "wd_kind"},
        config,
        ema_kind=config.ijepa.ema_schedule,
        wd_kind=config.ijepa.wd_schedule,
    )
    schedules(0)  # unknown schedule kinds fail here, with the optim module's message
    init = functools.partial(
        create_train_state,
        config=config,
        encoder=encoder,
        predictor=predictor,
        spec=spec,
        tx=tx,
        probe=probe,
        probe_tx=probe_tx,
    )
    step = functools.partial(
        train_step,
        encoder=encoder,
        predictor=predictor,
        tx=tx,
        schedules=schedules,
        seed=config.seed,
        loss=config.ijepa.loss,
        probe=probe,
        probe_tx=probe_tx,
    )

    def add_masks(batches: Iterator[dict], start_step: int) -> Iterator[dict]:
        return masked_batches(batches, spec, config.seed, start_step)

    return train.jit_trainer(mesh, init, step, encoder.grid_size, add_masks)
