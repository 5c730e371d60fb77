"""I-JEPA (Assran et al. 2023) as a method of the loop: the target encoder sees the whole
image; its LayerNorm'd output gathered at each of the multi-block targets is predicted, by a
narrow predictor, from the context encoder's features of the context block. Smooth-L1 (or
L2), AdamW, EMA. Official code: facebookresearch/ijepa `src/train.py`. Both encoders see the
data stream's 'context' view (with `data.aug='none'` the two views are the same crop).
"""

import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from scott_jax import objectives, optim
from scott_jax.config_checks import Checks
from scott_jax.evaluators.metrics import pooled_std
from scott_jax.masking_multiblock import MultiBlockSpec, check_spec, multiblock_masks
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
from scott_jax.models import encoder_kwargs, resolve_dtype
from scott_jax.models.ijepa import Encoder, Predictor
from scott_jax.models.transformer import gather_tokens

NAME = "ijepa"
#: Evaluation encoders: name -> path in the train state (the first is probe.py's default).
ENCODERS = {"context": ("params", "context_encoder"), "target": ("target_params",)}
MASK_KEYS = ("context_idx", "context_valid", "target_idx", "target_valid")
#: The `model.*` fields the I-JEPA encoder takes; its blocks have a GELU MLP, no dropout
#: and no registers, so `ffn_layer`, `dropout_rate`, `attention_dropout`,
#: `stochastic_depth_rate` and `num_register_tokens` do not apply.
MODEL_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "conv_impl")


def check_config(config: ml_collections.ConfigDict) -> None:
    """I-JEPA's own fields, before any data is read or anything compiled."""
    c = Checks(config)
    if config.data.color_on_device:
        c.fail(
            "config.data.color_on_device is for MIM-JEPA's two views; I-JEPA reads one view "
            "(the recipe has no colour augmentation): set it to False"
        )
    c.choice("ijepa.loss", objectives.IJEPA_LOSSES)
    if config.data.aug == "moca":
        c.fail("config.data.aug='moca' makes MOCA's two unaligned crops; this method needs one")
    c.choice("ijepa.wd_schedule", optim.WD_KINDS)
    c.choice("ijepa.ema_schedule", optim.EMA_KINDS)
    c.number("ijepa.num_targets", low=1, integer=True)
    for name in ("target_scale", "context_scale"):
        c.fraction_range(f"ijepa.{name}")
    c.number("ijepa.min_keep", low=1, integer=True)
    c.number("ijepa.max_context_tokens", low=1, integer=True, optional=True)
    c.number("ijepa.predictor_dim", low=1, integer=True)
    c.number("ijepa.predictor_depth", low=1, integer=True)
    c.number("ijepa.predictor_heads", low=1, integer=True, optional=True)
    c.number("ijepa.drop_path_rate", low=0, high=1, high_open=True)
    check_ema_and_monitors(c)
    c.done()


def build_encoder(config: Mapping, compute_dtype: str | None = None) -> Encoder:
    """The I-JEPA encoder of a run config (ConfigDict or its saved dict): the variant's
    tokenizer, depth and heads, the `MODEL_FIELDS` overrides of `model.*`, and
    `ijepa.drop_path_rate` / `ijepa.depth_rescale_init`."""
    dtype = resolve_dtype(compute_dtype or config.get("compute_dtype", "float32"))
    overrides = {k: v for k, v in dict(config.get("model", {})).items() if v is not None}
    kwargs = encoder_kwargs(  # checks the grid with the run's patch size
        config["variant"],
        config["img_size"],
        **{k: v for k, v in overrides.items() if k in MODEL_FIELDS},
    )
    return Encoder(
        **{k: kwargs[k] for k in ("tokenizer", "img_size", *MODEL_FIELDS) if k in kwargs},
        drop_path_rate=config["ijepa"]["drop_path_rate"],
        depth_rescale_init=config["ijepa"]["depth_rescale_init"],
        dtype=dtype,
    )


def build_models(config: ml_collections.ConfigDict) -> tuple[Encoder, Predictor]:
    """(encoder, predictor): the predictor from `config.ijepa` (width `predictor_dim`,
    `predictor_depth` blocks, `predictor_heads` or the encoder's heads, the encoder's MLP
    ratio, as the paper)."""
    encoder = build_encoder(config)
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


def train_source(config: ml_collections.ConfigDict):
    return pretrain_source(config)


# --------------------------------------------------------------------------- state and step


def create_train_state(rng, *, config, encoder, predictor, spec, tx, probe: OnlineProbe | None):
    """Fresh state: the target encoder starts as a copy of the context encoder."""
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
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=jax.tree.map(jnp.copy, context_params),
        opt_state=tx.init(params),
        probe=None
        if probe is None
        else probe.init(probe_rng, encoder.num_patches, encoder.embed_dim),
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
    loss: str = "smooth_l1",
    probe: OnlineProbe | None = None,
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
        "target_std": pooled_std(features),
        "context_tokens": context_valid.sum(-1).mean(dtype=jnp.float32),
        "target_tokens": target_valid[:, 0].sum(-1).mean(dtype=jnp.float32),
    }
    probe_state = state.probe
    if probe is not None:
        probe_state, probe_metrics = probe.update(
            state.probe, features, batch["label"], jax.random.fold_in(rng, 1)
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


def masked_batches(
    batches: Iterator[dict], spec: MultiBlockSpec, seed: int, start_step: int
) -> Iterator[dict]:
    """Data batches -> step batches: 'image' (the 'context' view), 'label', and the step's
    multi-block masks, a pure function of (seed, step): this host's rows of the global batch's."""
    for step, batch in enumerate(batches, start=start_step):
        masks = host_rows(
            lambda n, step=step: multiblock_masks(spec, seed, step, n), batch["context"].shape[0]
        )
        yield {"image": batch["context"], "label": batch["label"], **masks}


def build_trainer(
    config: ml_collections.ConfigDict, lengths: optim.RunLengths, mesh: jax.sharding.Mesh, source
) -> Trainer:
    """Models, AdamW with the `config.ijepa` WD and EMA schedules, static mask shapes, the
    online probe and k-NN, jitted over `mesh`."""
    encoder, predictor = build_models(config)
    spec = MultiBlockSpec.from_config(config, encoder.grid_size)
    check_spec(spec)  # fail here, not in the input thread
    optimizer = optim.make(
        config.optim,
        lengths,
        wd_kind=config.ijepa.wd_schedule,
        ema_kind=config.ijepa.ema_schedule,
    )
    probe = online_probe(config, source, optimizer)
    init = functools.partial(
        create_train_state,
        config=config,
        encoder=encoder,
        predictor=predictor,
        spec=spec,
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
        loss=config.ijepa.loss,
        probe=probe,
    )

    def add_masks(batches: Iterator[dict], start_step: int) -> Iterator[dict]:
        return masked_batches(batches, spec, config.seed, start_step)

    evaluators = online_knn(config, encoder, ENCODERS, lengths, mesh)
    return jit_trainer(mesh, init, step, add_masks=add_masks, evaluators=evaluators)
