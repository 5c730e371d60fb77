"""MOCA (Gidaris et al., "MOCA: Self-supervised Representation Learning by Predicting Masked
Online Codebook Assignments", TMLR 2024) as a method of the loop; official code valeoai/MOCA
(`models_moca.py`, `main_pretrain.py`).

An EMA teacher assigns its tokens of two unmasked views softly to an online codebook (a queue
of its own past tokens). The student sees each view masked in two rounds and predicts, with
prototypes generated from the codebook, the other view's bag of words from its [AVG] token
(image level) and, through a condenser decoder, the same view's token assignments (local).
KL losses 0.5 / 0.5, AdamW with a constant-LR group for the generators, global-norm clip, and
the teacher EMA. The codebook, its pointer and the temperature statistic μ̄ are in the state.
"""

import functools
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from scott_jax import masking_moca, objectives, optim
from scott_jax.evaluators.metrics import pooled_std
from scott_jax.methods.base import (
    OnlineProbe,
    Trainer,
    host_rows,
    jit_trainer,
    online_knn,
    online_probe,
    pretrain_source,
)
from scott_jax.models import encoder_kwargs, resolve_dtype
from scott_jax.models import moca as models

NAME = "moca"
#: Evaluation encoders: name -> path in the train state; the teacher first, as every MOCA
#: evaluation (paper App. C.3).
ENCODERS = {"target": ("target_params",), "context": ("params", "context_encoder")}
#: The `model.*` fields the MOCA encoder takes (timm blocks: no dropout, no registers).
MODEL_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "conv_impl")
LOC_LOSS_ON = ("all", "masked")
GENERATORS = ("wgen_img", "wgen_loc")


def check_config(config: ml_collections.ConfigDict) -> None:
    """MOCA's own fields, before any data is read or anything compiled."""
    c = config.moca
    if config.data.color_on_device:
        raise ValueError(
            "config.data.color_on_device is for MIM-JEPA's shared crop; MOCA reads two views: "
            "set it to False"
        )
    if c.loc_loss_on not in LOC_LOSS_ON:
        raise ValueError(f"unknown config.moca.loc_loss_on {c.loc_loss_on!r}; one of {LOC_LOSS_ON}")
    if c.num_words % c.num_new_words or c.num_new_words > config.batch_size:
        raise ValueError(
            f"config.moca.num_words={c.num_words} must be a multiple of num_new_words="
            f"{c.num_new_words}, and that at most batch_size={config.batch_size}"
        )
    for name in ("kappa", "inv_delta", "lr_epochs_mul", "clip_grad", "pred_mlp_ratio"):
        if not c[name] > 0:
            raise ValueError(f"config.moca.{name} must be > 0, got {c[name]}")
    if c.grad_chunks < 1 or config.batch_size % c.grad_chunks:
        raise ValueError(
            f"config.moca.grad_chunks={c.grad_chunks} must divide batch_size={config.batch_size}"
        )
    if c.lr_epochs_mul < 1:
        raise ValueError(f"config.moca.lr_epochs_mul must be >= 1, got {c.lr_epochs_mul}")
    encoder = build_encoder(config)
    if c.intermediate_layer is not None and not 1 <= c.intermediate_layer <= encoder.depth:
        raise ValueError(
            f"config.moca.intermediate_layer={c.intermediate_layer} is not a block of the "
            f"depth-{encoder.depth} encoder (1-based; None: round(2·depth/3))"
        )
    models.interior(encoder.grid_size, c.bow_border)
    mask_sizes(config, encoder.num_patches)
    if c.decoder_dim % c.decoder_heads or c.decoder_dim % 4:
        raise ValueError(
            f"config.moca.decoder_dim={c.decoder_dim} must be divisible by decoder_heads="
            f"{c.decoder_heads} and by 4 (the sin-cos position embedding)"
        )


def mask_sizes(config, num_patches: int) -> tuple[masking_moca.Round, ...]:
    c = config.moca
    return masking_moca.rounds(num_patches, c.mask_ratio, c.dec_mask_ratio, c.complementary)


def intermediate_layer(config, depth: int) -> int:
    """ℓ (1-based): `moca.intermediate_layer`, or round(2·depth/3) (the paper's 8 of 12)."""
    layer = config["moca"]["intermediate_layer"]
    return round(2 * depth / 3) if layer is None else layer


def build_encoder(config: Mapping, compute_dtype: str | None = None) -> models.Encoder:
    """The student / teacher encoder of a run config (ConfigDict or its saved dict): the
    variant's tokenizer, depth and heads with the `MODEL_FIELDS` overrides of `model.*`."""
    dtype = resolve_dtype(compute_dtype or config.get("compute_dtype", "float32"))
    overrides = {k: v for k, v in dict(config.get("model", {})).items() if v is not None}
    kwargs = encoder_kwargs(config["variant"], config["img_size"])
    kwargs.update({k: v for k, v in overrides.items() if k in MODEL_FIELDS})
    return models.Encoder(
        **{k: kwargs[k] for k in ("tokenizer", "img_size", *MODEL_FIELDS)},
        cls_token=config["moca"]["cls_token"],
        remat=bool(dict(config.get("model", {})).get("remat", False)),
        dtype=dtype,
    )


class Models(NamedTuple):
    encoder: models.Encoder
    decoder: models.CondenserDecoder
    wgen_img: models.WeightGenerator
    wgen_loc: models.WeightGenerator


def build_models(config: ml_collections.ConfigDict) -> Models:
    """Encoder, condenser decoder (`moca.decoder_*`) and the two weight generators (hidden
    width int(pred_mlp_ratio·D); image-level out D, local out d)."""
    encoder = build_encoder(config)
    c = config.moca
    hidden = int(encoder.embed_dim * c.pred_mlp_ratio)
    return Models(
        encoder,
        models.CondenserDecoder(
            encoder.grid_size,
            c.decoder_dim,
            c.decoder_depth,
            c.decoder_heads,
            encoder.mlp_ratio,
            remat=encoder.remat,
            dtype=encoder.dtype,
        ),
        models.WeightGenerator(encoder.embed_dim, hidden),
        models.WeightGenerator(c.decoder_dim, hidden),
    )


class Settings(NamedTuple):
    """The step's static settings, from `config.moca`."""

    sizes: tuple[masking_moca.Round, ...]
    layer: int
    kappa: float
    inv_delta: float
    border: int
    num_new_words: int
    loc_loss_on: str
    img_weight: float
    loc_weight: float
    grad_chunks: int

    @classmethod
    def from_config(cls, config, encoder: models.Encoder) -> "Settings":
        c = config.moca
        return cls(
            mask_sizes(config, encoder.num_patches),
            intermediate_layer(config, encoder.depth),
            c.kappa,
            c.inv_delta,
            c.bow_border,
            c.num_new_words,
            c.loc_loss_on,
            c.img_weight,
            c.loc_weight,
            c.grad_chunks,
        )


def train_source(config: ml_collections.ConfigDict):
    return pretrain_source(config)


# --------------------------------------------------------------------------- state and step


@flax.struct.dataclass
class MocaState:
    """MOCA's train state, replicated over the mesh.

    params: the student, {'context_encoder', 'decoder', 'wgen_img', 'wgen_loc'}.
    target_params: the EMA teacher (the context encoder's tree).
    codebook: {'words' [K, D] unit rows, 'ptr' int32 (the oldest row), 'mu' float32 (μ̄)}.
    The official `_dist_norm_prev` equals `_dist_norm` at every step boundary, so μ̄ alone
    is the state. probe: the online monitoring probe, or None.
    """

    step: jax.Array
    params: dict
    target_params: dict
    opt_state: optax.OptState
    codebook: dict
    probe: dict | None = None


def init_codebook(rng, num_words: int, dim: int) -> jax.Array:
    """`BoWExtractor`'s init: randn(K, D) clamped at 0, then L2-normalised rows."""
    return models.l2_normalize(jnp.maximum(jax.random.normal(rng, (num_words, dim)), 0.0))


def create_train_state(rng, *, config, nets: Models, settings: Settings, tx, probe):
    """Fresh state: the teacher a copy of the student's encoder, μ̄ = 0.5, pointer 0."""
    encoder_rng, heads_rng, probe_rng = jax.random.split(rng, 3)
    decoder_rng, img_rng, loc_rng, words_rng = jax.random.split(heads_rng, 4)
    encoder = nets.encoder
    images = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    encoder_params = encoder.init(encoder_rng, images)["params"]
    keep, dec = settings.sizes[0]
    tokens = jnp.zeros((1, keep, encoder.embed_dim), jnp.float32)
    idx = jnp.arange(dec, dtype=jnp.int32)[None]
    words = init_codebook(words_rng, config.moca.num_words, encoder.embed_dim)
    params = {
        "context_encoder": encoder_params,
        "decoder": nets.decoder.init(
            decoder_rng, tokens[:, 0], tokens, idx[:, :keep], idx[:, keep:]
        )["params"],
        "wgen_img": nets.wgen_img.init(img_rng, words)["params"],
        "wgen_loc": nets.wgen_loc.init(loc_rng, words)["params"],
    }
    return MocaState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=jax.tree.map(jnp.copy, encoder_params),
        opt_state=tx.init(params),
        codebook={
            "words": words,
            "ptr": jnp.zeros((), jnp.int32),
            "mu": jnp.full((), 0.5, jnp.float32),
        },
        probe=None
        if probe is None
        else probe.init(probe_rng, encoder.num_patches, encoder.embed_dim),
    )


def draw_new_words(rng, batch_size: int, grid: int, settings: Settings):
    """The codebook update's random picks (`BoWExtractor.update`, `extract_targets`): one view
    (p 0.5 each), K_new distinct images and one interior token per image -> (view int32
    scalar, images [K_new], tokens [K_new] as patch indices)."""
    view_rng, image_rng, token_rng = jax.random.split(rng, 3)
    inner = jnp.asarray(models.interior(grid, settings.border))
    images = jax.random.permutation(image_rng, batch_size)[: settings.num_new_words]
    tokens = inner[jax.random.randint(token_rng, (settings.num_new_words,), 0, inner.shape[0])]
    return jax.random.bernoulli(view_rng).astype(jnp.int32), images, tokens


def teacher_targets(target_params, codebook: dict, views, *, encoder, settings: Settings):
    """The teacher's targets for views [B, 2, S, S, 3] with the step's codebook and μ̄.

    -> (features [B, 2, N, D] (LN'd last layer), q [B, 2, N, K] token assignments, bow
    [B, 2, K] bags of words, μ̄ after its two per-view updates (view 1, then view 2))."""
    batch = views.shape[0]
    features = encoder.apply({"params": target_params}, views.reshape(-1, *views.shape[2:]))
    features = jax.lax.stop_gradient(features.reshape(batch, 2, *features.shape[1:]))
    mu, qs = codebook["mu"], []
    for v in range(2):  # μ̄ of the previous step sets both views' temperature
        q, stat = models.assign(
            features[:, v], codebook["words"], codebook["mu"], settings.inv_delta
        )
        mu = models.MU_DECAY * mu + (1.0 - models.MU_DECAY) * stat
        qs.append(q)
    q = jnp.stack(qs, 1)
    return features, q, models.bag_of_words(q, encoder.grid_size, settings.border), mu


def prototypes(params, codebook_words, *, nets: Models):
    """The dynamic heads' prototypes from the step's codebook [K, D]: (W^b = G^b(C) [K, D],
    W^d = G^d(C) [K, d]), paper §3.2.1."""
    w_img = nets.wgen_img.apply({"params": params["wgen_img"]}, codebook_words)
    w_loc = nets.wgen_loc.apply({"params": params["wgen_loc"]}, codebook_words)
    return w_img, w_loc


def student_losses(params, protos, views, ids, q, bow, *, nets: Models, settings):
    """L_img and L_loc (paper Eq. 3 and 6 as KL; `MOCA.forward`): params holds the student's
    'context_encoder' and 'decoder', protos = (W^b, W^d) (`prototypes`), views [B, 2, S, S, 3],
    ids [B, 2, R, N] (`masking_moca`), q [B, 2, N, K] and bow [B, 2, K] the teacher's targets.

    Per round r, for the 2B student rows (row 2b + v is view v of image b): L_img^r = KL of
    the *other* view's bag of words to softmax(κ·⟨ā, W^b⟩); L_loc^r = KL of the same view's
    assignments to softmax(κ·⟨o_i, W^d⟩) over the decoded tokens (all of them, or only M'
    with `loc_loss_on='masked'`), a mean over rows and tokens. L_img and L_loc are 2 × the
    mean over rounds (the sum over the two views of the paper's per-image loss). Every row
    is computed on its own (no dropout or drop-path, LayerNorm only), so the losses of a
    batch are the mean of those of equal parts of it (`loss_and_grads`).
    """
    rows = views.shape[0] * 2
    x = views.reshape(rows, *views.shape[2:])
    num_words = q.shape[-1]
    q = q.reshape(rows, -1, num_words)
    other_bow = bow[:, ::-1].reshape(rows, num_words)
    w_img, w_loc = protos
    ids = ids.reshape(rows, *ids.shape[2:])
    img, loc = [], []
    for r, (keep, dec) in enumerate(settings.sizes):
        visible, masked = ids[:, r, :keep], ids[:, r, keep:dec]
        last, inner = nets.encoder.apply(
            {"params": params["context_encoder"]}, x, visible, intermediate=settings.layer
        )
        avg = last.mean(1)  # [AVG]: the mean of the visible last-layer tokens
        img.append(models.kl_div(other_bow, models.prototype_logits(avg, w_img, settings.kappa)))
        out = nets.decoder.apply({"params": params["decoder"]}, avg, inner, visible, masked)
        first = keep if settings.loc_loss_on == "masked" else 0
        targets = jnp.take_along_axis(q, ids[:, r, first:dec, None], axis=1)
        logits = models.prototype_logits(out[:, first:], w_loc, settings.kappa)
        loc.append(models.kl_div(targets, logits))
    return 2.0 * jnp.mean(jnp.stack(img)), 2.0 * jnp.mean(jnp.stack(loc))


def split_images(x: jax.Array, chunks: int) -> jax.Array:
    """[B, ...] -> [chunks, B / chunks, ...], chunk j = images j, j + chunks, ...: strided, so
    that a batch sharded over 'data' gives every device a share of every chunk."""
    return jnp.swapaxes(x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]), 0, 1)


def loss_and_grads(params, views, ids, q, bow, codebook_words, *, nets, settings):
    """((L, (L_img, L_loc)), ∂L/∂params) with L = img_weight·L_img + loc_weight·L_loc, for
    `student_losses`' inputs and the step's codebook; params: the whole student.

    With `settings.grad_chunks` = k > 1 the images are split into k equal parts and a
    `lax.scan` runs the forward and backward pass of one part at a time, summing the
    gradients: the losses are means over rows, so L and its gradient are the mean over the
    parts, the same numbers up to float round-off, while only one part's activations are alive
    at a time. The prototypes depend on the whole codebook, not on the images: they are made
    once, and their summed gradient is pulled back through the generators once.
    """
    student = {k: v for k, v in params.items() if k not in GENERATORS}
    protos, pull_back = jax.vjp(
        lambda p: prototypes(p, codebook_words, nets=nets), {k: params[k] for k in GENERATORS}
    )

    def loss_fn(student, protos, part):
        img, loc = student_losses(student, protos, *part, nets=nets, settings=settings)
        return settings.img_weight * img + settings.loc_weight * loc, (img, loc)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def accumulate(total, part):
        value, grads = grad_fn(student, protos, part)
        return jax.tree.map(jnp.add, total, (value, grads)), None

    chunks = settings.grad_chunks
    parts = jax.tree.map(lambda x: split_images(x, chunks), (views, ids, q, bow))
    zero = jnp.zeros((), jnp.float32)
    zeros = ((zero, (zero, zero)), jax.tree.map(jnp.zeros_like, (student, protos)))
    total, _ = jax.lax.scan(accumulate, zeros, parts)
    (loss, aux), (student_grads, proto_grads) = jax.tree.map(lambda t: t / chunks, total)
    return (loss, aux), {**student_grads, **pull_back(proto_grads)[0]}


def train_step(
    state: MocaState,
    batch: dict,
    *,
    nets: Models,
    settings: Settings,
    tx: optax.GradientTransformation,
    schedules,
    seed: int,
    probe: OnlineProbe | None = None,
    new_words=None,
):
    """One MOCA update (`main_pretrain.train_one_epoch`, `MOCA.forward`); returns (new state,
    metrics).

    batch: 'view1', 'view2' [B, S, S, 3], 'ids' [B, 2, R, N] (the masks, a pure function of
    the step), 'label' [B] when the online probe is on. Order: teacher targets with the
    codebook and μ̄ of the previous step; the codebook update from one view (the new words
    drawn from `fold_in(seed, step)`, or `new_words` = (view, images, tokens) given); the
    student's losses and gradients with the old codebook (`loss_and_grads`, in
    `moca.grad_chunks` parts of the batch); clip + AdamW; then the teacher EMA with m(k + 1),
    which is the code's EMA at the start of the next step (same numbers).
    """
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    views = jnp.stack([batch["view1"], batch["view2"]], 1)
    features, q, bow, mu = teacher_targets(
        state.target_params, state.codebook, views, encoder=nets.encoder, settings=settings
    )
    if new_words is None:
        new_words = draw_new_words(rng, views.shape[0], nets.encoder.grid_size, settings)
    view, images, tokens = new_words
    picked = jnp.take(features, view, axis=1)[images, tokens]  # [K_new, D]
    words, ptr = models.insert_words(
        state.codebook["words"], state.codebook["ptr"], models.l2_normalize(picked)
    )

    (loss, (img, loc)), grads = loss_and_grads(
        state.params,
        views,
        batch["ids"],
        q,
        bow,
        state.codebook["words"],
        nets=nets,
        settings=settings,
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    values = schedules(state.step)
    target_params = optim.ema_update(state.target_params, params["context_encoder"], values["ema"])
    metrics = {
        "loss": loss,
        "loss/img": img,
        "loss/loc": loc,
        **values,
        "mu": mu,
        "grad_norm": optax.tree.norm(grads),
        "grad_norm/encoder": optax.tree.norm(grads["context_encoder"]),
        "target_std": pooled_std(objectives.target_features(features[:, 0])),
    }
    probe_state = state.probe
    if probe is not None:
        probe_state, probe_metrics = probe.update(
            state.probe,
            objectives.target_features(features[:, 0]),
            batch["label"],
            jax.random.fold_in(rng, 1),
        )
        metrics.update(probe_metrics)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        target_params=target_params,
        opt_state=opt_state,
        codebook={"words": words, "ptr": ptr, "mu": mu},
        probe=probe_state,
    )
    return new_state, metrics


# --------------------------------------------------------------------------- input and trainer


def masked_batches(batches: Iterator[dict], config, sizes, num_patches, start_step: int):
    """Data batches -> step batches: 'view1' / 'view2' (the stream's two views), 'label' and
    'ids', the step's masks (`masking_moca.moca_masks`, pure in (seed, step, process))."""
    for step, batch in enumerate(batches, start=start_step):
        ids = host_rows(
            lambda n, step=step: masking_moca.moca_masks(
                config.seed, step, n, num_patches, sizes, config.moca.complementary
            ),
            batch["label"].shape[0],
        )
        yield {
            "view1": batch["context"],
            "view2": batch["target"],
            "label": batch["label"],
            "ids": ids,
        }


def generator_leaves(params: dict) -> dict:
    """True on the weight generators' leaves: their own optimizer group."""
    return {k: jax.tree.map(lambda _, g=k in GENERATORS: g, v) for k, v in params.items()}


def make_optimizer(config, lengths: optim.RunLengths) -> optim.Optimizer:
    """The released recipe (`main_pretrain.py`, `util/misc.py`): LR and WD at e = t / ipe
    (0-based), LR warmup from 0 then cosine to 0 at int(lr_epochs_mul·E) epochs, WD cosine from
    `optim.wd_start` to `wd_final`, the generators at constant `moca.lr_wgen` / `wd_wgen`, the
    global gradient norm clipped at `moca.clip_grad`, EMA cosine to 1 (k + 1)."""
    c = config.moca
    decay_epochs = int(config.num_epochs * c.lr_epochs_mul)
    return optim.make(
        config.optim,
        lengths,
        wd_kind="cosine",
        ema_kind="cosine",
        first_step=0,
        lr_decay_steps=decay_epochs * lengths.steps_per_epoch,
        clip_norm=c.clip_grad,
        constant_group=optim.ConstantGroup(
            "wgen",
            generator_leaves,
            c.lr_wgen,
            c.wd_wgen,
        ),
    )


def build_trainer(
    config: ml_collections.ConfigDict, lengths: optim.RunLengths, mesh: jax.sharding.Mesh, source
) -> Trainer:
    """Models, the released optimisation recipe, static mask sizes, the online probe and
    k-NN, jitted over `mesh`."""
    nets = build_models(config)
    settings = Settings.from_config(config, nets.encoder)
    optimizer = make_optimizer(config, lengths)
    probe = online_probe(config, source, optimizer)
    init = functools.partial(
        create_train_state,
        config=config,
        nets=nets,
        settings=settings,
        tx=optimizer.tx,
        probe=probe,
    )
    step = functools.partial(
        train_step,
        nets=nets,
        settings=settings,
        tx=optimizer.tx,
        schedules=optimizer.schedules,
        seed=config.seed,
        probe=probe,
    )

    def add_masks(batches: Iterator[dict], start_step: int) -> Iterator[dict]:
        return masked_batches(batches, config, settings.sizes, nets.encoder.num_patches, start_step)

    evaluators = online_knn(config, nets.encoder, ENCODERS, lengths, mesh)
    return jit_trainer(
        mesh,
        init,
        step,
        add_masks=add_masks,
        evaluators=evaluators,
        progress_keys=("loss", "loss/img", "loss/loc", "lr"),
    )
