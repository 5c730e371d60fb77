"""SplitMask (El-Nouby et al., "Are Large-scale Datasets Necessary for Self-Supervised
Pre-training?", §4) as a method of the loop. No official code exists; the rest follows BEiT
(microsoft/unilm beit), as the paper does.

The patches of one augmented view are split into two subsets A and B (`masking_split`). The
encoder sees each subset alone; a shallow decoder fills in the other positions; each branch
predicts the visual words (`visual_words`) of the patches it does not see (cross-entropy) and
the two branches' mean-pooled decoder outputs are matched by a symmetric InfoNCE. No teacher,
no EMA: one encoder, probe.py's only choice. docs/deviations.md lists every reading chosen
where the paper is silent; each is a `config.splitmask.*` flag.
"""

import functools
import logging
from collections.abc import Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scott_jax import masking_split, objectives, optim, visual_words
from scott_jax.config_checks import Checks
from scott_jax.methods.base import Trainer, host_rows, jit_trainer, online_knn, pretrain_source
from scott_jax.models import encoder_kwargs, resolve_dtype
from scott_jax.models.splitmask import (
    DECODER_POS,
    POS_EMBEDS,
    Decoder,
    Encoder,
    mim_head,
    position_table,
)
from scott_jax.models.transformer import gather_tokens

log = logging.getLogger(__name__)

NAME = "splitmask"
#: Evaluation encoders: name -> path in the train state. There is no teacher, so probe.py's
#: `--config.encoder=target` is an error for a SplitMask run.
ENCODERS = {"encoder": ("params", "encoder")}
MASK_KEYS = ("a_visible", "a_predict", "b_visible", "b_predict")
#: The `model.*` fields the SplitMask encoder takes (I-JEPA's pre-norm GELU blocks: no
#: dropout, registers or SwiGLU).
MODEL_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "conv_impl")
#: {flag: allowed values} of the `config.splitmask` choices, checked before anything runs.
CHOICES = {
    "target": visual_words.TARGETS,
    "vocab_dist": visual_words.VOCAB_DISTS,
    "token_pixels": visual_words.TOKEN_PIXELS,
    "split": masking_split.SPLITS,
    "decoder_pos": DECODER_POS,
    "pos_embed": POS_EMBEDS,
    "negatives": objectives.NCE_NEGATIVES,
    "descriptor": ("all", "visible"),
    "lr_schedule": optim.LR_KINDS,
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """SplitMask's own fields, before any data is read or anything compiled."""
    c = Checks(config)
    for name, allowed in CHOICES.items():
        c.choice(f"splitmask.{name}", allowed)
    for name in ("vocab_size", "kmeans_patches", "decoder_depth"):
        c.number(f"splitmask.{name}", low=2 if name == "vocab_size" else 1, integer=True)
    c.number("splitmask.kmeans_iters", low=0, integer=True)
    c.number("splitmask.decoder_heads", low=1, integer=True, optional=True)
    c.number("splitmask.drop_path_rate", low=0, high=1, high_open=True)
    for name in ("tau", "clip_grad"):
        c.number(f"splitmask.{name}", low=0, low_open=True)
    for name in ("mim_weight", "nce_weight"):
        c.number(f"splitmask.{name}", low=0)
    c.number("knn_every_epochs", low=0)
    if config.data.color_on_device:
        c.fail(
            "config.data.color_on_device is for MIM-JEPA's two views; SplitMask reads one view: "
            "set it to False"
        )
    if config.online_probe:
        c.fail(
            "SplitMask has no online probe (it has no target encoder); monitor it with "
            "config.knn_every_epochs instead"
        )
    c.done()
    encoder = build_encoder(config)  # unknown variant / dtype / patch size fail here
    if encoder.patch_size % 2:
        c.fail(
            f"the visual-word tokenizer reads patches at half resolution: patch_size "
            f"{encoder.patch_size} must be even"
        )
    heads = config.splitmask.decoder_heads or encoder.num_heads
    if encoder.embed_dim % heads:
        c.fail(
            f"the decoder's width {encoder.embed_dim} is not divisible by its {heads} heads "
            "(config.splitmask.decoder_heads)"
        )
    c.done()


def build_encoder(config: Mapping, compute_dtype: str | None = None) -> Encoder:
    """The SplitMask encoder of a run config (ConfigDict or its saved dict): the variant's
    tokenizer, depth and heads, the `MODEL_FIELDS` overrides of `model.*`, and
    `splitmask.drop_path_rate` / `depth_rescale_init` / `pos_embed`."""
    dtype = resolve_dtype(compute_dtype or config.get("compute_dtype", "float32"))
    overrides = {k: v for k, v in dict(config.get("model", {})).items() if v is not None}
    kwargs = encoder_kwargs(
        config["variant"],
        config["img_size"],
        **{k: v for k, v in overrides.items() if k in MODEL_FIELDS},
    )
    c = config["splitmask"]
    return Encoder(
        **{k: kwargs[k] for k in ("tokenizer", "img_size", *MODEL_FIELDS)},
        drop_path_rate=c["drop_path_rate"],
        depth_rescale_init=c["depth_rescale_init"],
        pos_embed=c["pos_embed"],
        dtype=dtype,
    )


def build_models(config: ml_collections.ConfigDict):
    """(encoder, decoder, head): the decoder has the encoder's width, `decoder_depth` blocks
    and `decoder_heads` (None: the encoder's) heads; the head maps to `vocab_size` words."""
    encoder = build_encoder(config)
    c = config.splitmask
    decoder = Decoder(
        depth=c.decoder_depth,
        num_heads=c.decoder_heads or encoder.num_heads,
        mlp_ratio=encoder.mlp_ratio,
        depth_rescale_init=c.depth_rescale_init,
        decoder_pos=c.decoder_pos,
        dtype=encoder.dtype,
    )
    return encoder, decoder, mim_head(c.vocab_size, encoder.dtype)


def train_source(config: ml_collections.ConfigDict):
    return pretrain_source(config)


# --------------------------------------------------------------------------- vocabulary


def data_vocabulary(config: ml_collections.ConfigDict, source, encoder: Encoder) -> np.ndarray:
    """The 'random_patches' / 'kmeans' vocabulary [V, d] (unit rows) from the pretraining
    images (resized and centre-cropped as for evaluation), built once at the start of a run
    and kept in the train state. A pure function of the seed and the data."""
    from scott_jax.data import eval_batches  # TensorFlow only where data is read

    c = config.splitmask
    num_patches = encoder.num_patches
    if c.target == "kmeans" and source.num_examples * num_patches < c.vocab_size:
        raise ValueError(
            f"k-means needs {c.vocab_size} patches and the data has "
            f"{source.num_examples * num_patches}: lower config.splitmask.vocab_size"
        )
    images, positions = visual_words.patch_picks(
        c.target, config.seed, source.num_examples, num_patches, c.vocab_size, c.kmeans_patches
    )
    dim = 3 * (encoder.patch_size // 2) ** 2
    points = np.zeros((len(images), dim), np.float32)
    patches_of = jax.jit(
        functools.partial(
            visual_words.tokenizer_patches, patch_size=encoder.patch_size, pixels=c.token_pixels
        )
    )
    batch_size = config.batch_size
    batches = eval_batches(source, batch_size=batch_size, img_size=config.img_size)
    for i, batch in enumerate(batches):
        start = i * batch_size
        here = (images >= start) & (images < start + batch_size)
        patches = np.asarray(patches_of(batch["image"]))
        points[here] = patches[images[here] - start, positions[here]]
    if c.target == "kmeans":
        log.info("k-means of %d patches into %d visual words.", len(points), c.vocab_size)
        points = visual_words.kmeans(jnp.asarray(points), c.vocab_size, c.kmeans_iters, config.seed)
    return np.asarray(visual_words.normalize_rows(jnp.asarray(points)))


# --------------------------------------------------------------------------- state and step


@flax.struct.dataclass
class SplitMaskState:
    """params: {'encoder', 'decoder', 'head'}, trained by `opt_state`'s AdamW. vocab: the
    data vocabulary [V, d] ('random_patches', 'kmeans'), None for random projections (those
    are regenerated from the seed at every step)."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    vocab: jax.Array | None = None


def create_train_state(rng, *, config, encoder, decoder, head, tx, vocab):
    """Fresh state. The encoder draws from split(rng, 3)[0], as every method's first encoder
    (probe.py's 'random' baseline rebuilds it from that key)."""
    encoder_rng, decoder_rng, head_rng = jax.random.split(rng, 3)
    images = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    encoder_params = encoder.init(encoder_rng, images)["params"]
    width = encoder.embed_dim
    features = jnp.zeros((1, 1, width), jnp.float32)
    pos = jnp.zeros((encoder.num_patches, width), jnp.float32)
    params = {
        "encoder": encoder_params,
        "decoder": decoder.init(
            decoder_rng, features, jnp.zeros((1, 1), jnp.int32), pos, train=False
        )["params"],
        "head": head.init(head_rng, features)["params"],
    }
    return SplitMaskState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        vocab=None if vocab is None else jnp.asarray(vocab),
    )


def train_step(
    state: SplitMaskState,
    batch: dict,
    *,
    encoder: Encoder,
    decoder: Decoder,
    head,
    tx: optax.GradientTransformation,
    schedules,
    seed: int,
    settings: Mapping,
):
    """One SplitMask update; returns (new state, metrics of this step).

    batch: 'image' [B, S, S, 3] (the one augmented view) and the split (`MASK_KEYS`, shapes
    in `masking_split.split_masks`). `settings`: the `config.splitmask` block. Drop path draws
    from `fold_in(seed, step)`, so a resumed run equals an uninterrupted one.
    """
    c = settings
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    images = batch["image"]
    patches = visual_words.tokenizer_patches(images, encoder.patch_size, c["token_pixels"])
    vocab = state.vocab
    if vocab is None:
        vocab = visual_words.random_projection_vocab(
            seed, c["vocab_size"], patches.shape[-1], c["vocab_dist"]
        )
    tokens = visual_words.tokenize(patches, vocab)  # [B, N], no gradient

    def branches(params, visible, predict, rng):
        """The subsets `visible` int [k·B, n] of the batch's images repeated k times (k = 1:
        one branch, k = 2: both in one pass): (MIM loss over the `predict` [k·B, P] tokens,
        top-1 of those word predictions, descriptors [k·B, D])."""
        repeats = visible.shape[0] // images.shape[0]
        features = encoder.apply(
            {"params": params["encoder"]},
            jnp.tile(images, (repeats, 1, 1, 1)),
            visible,
            train=True,
            rngs={"drop_path": rng},
        )
        pos = position_table(encoder, params["encoder"])
        decoded = decoder.apply({"params": params["decoder"]}, features, visible, pos, train=True)
        if c["descriptor"] == "all":
            descriptor = decoded.mean(axis=1)
        else:
            descriptor = gather_tokens(decoded, visible).mean(axis=1)
        logits = head.apply({"params": params["head"]}, gather_tokens(decoded, predict))
        targets = jnp.take_along_axis(jnp.tile(tokens, (repeats, 1)), predict, axis=1)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
        return objectives.mim_cross_entropy(logits, targets), accuracy, descriptor

    def loss_fn(params):
        a = batch["a_visible"], batch["a_predict"]
        b = batch["b_visible"], batch["b_predict"]
        if a[0].shape == b[0].shape:  # equal subsets: both branches in one [2B] pass
            visible, predict = (jnp.concatenate([x, y]) for x, y in zip(a, b, strict=True))
            mim, accuracy, z = branches(params, visible, predict, rng)
            za, zb = jnp.split(z, 2)
        else:
            rng_a, rng_b = jax.random.split(rng)
            mim_a, acc_a, za = branches(params, *a, rng_a)
            mim_b, acc_b, zb = branches(params, *b, rng_b)
            # The mean over every prediction of both branches (BEiT's CE over masked tokens).
            p_a, p_b = a[1].shape[1], b[1].shape[1]
            mim = (p_a * mim_a + p_b * mim_b) / (p_a + p_b)
            accuracy = (p_a * acc_a + p_b * acc_b) / (p_a + p_b)
        nce = objectives.info_nce(za, zb, c["tau"], c["negatives"])
        loss = c["mim_weight"] * mim + c["nce_weight"] * nce
        return loss, {"mim": mim, "nce": nce, "mim_top1": accuracy}

    (value, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": value,
        **parts,
        **schedules(state.step),
        "grad_norm": optax.tree.norm(grads),
        "grad_norm/encoder": optax.tree.norm(grads["encoder"]),
        "token_perplexity": visual_words.token_perplexity(tokens, c["vocab_size"]),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# --------------------------------------------------------------------------- input and trainer


def masked_batches(
    batches: Iterator[dict], grid: int, split: str, seed: int, start_step: int
) -> Iterator[dict]:
    """Data batches -> step batches: 'image' (the 'context' view) and the step's split, a
    pure function of (seed, step, process index)."""
    for step, batch in enumerate(batches, start=start_step):
        masks = host_rows(
            lambda n, step=step: masking_split.split_masks(seed, step, n, grid, split),
            batch["context"].shape[0],
        )
        yield {"image": batch["context"], **masks}


def build_trainer(
    config: ml_collections.ConfigDict, lengths: optim.RunLengths, mesh: jax.sharding.Mesh, source
) -> Trainer:
    """Models, AdamW (BEiT's schedule by default) after global-norm clipping, the data
    vocabulary when the target needs one, the online k-NN, jitted over `mesh`."""
    check_config(config)
    encoder, decoder, head = build_models(config)
    c = config.splitmask
    optimizer = optim.make(config.optim, lengths, lr_kind=c.lr_schedule, clip_norm=c.clip_grad)
    tx = optimizer.tx
    vocab = None
    if c.target != "random_projection":
        vocab = data_vocabulary(config, source, encoder)
    init = functools.partial(
        create_train_state,
        config=config,
        encoder=encoder,
        decoder=decoder,
        head=head,
        tx=tx,
        vocab=vocab,
    )
    step = functools.partial(
        train_step,
        encoder=encoder,
        decoder=decoder,
        head=head,
        tx=tx,
        schedules=optimizer.schedules,
        seed=config.seed,
        settings=c.to_dict(),
    )

    def add_masks(batches: Iterator[dict], start_step: int) -> Iterator[dict]:
        return masked_batches(batches, encoder.grid_size, c.split, config.seed, start_step)

    evaluators = online_knn(config, encoder, ENCODERS, lengths, mesh)
    return jit_trainer(
        mesh,
        init,
        step,
        add_masks=add_masks,
        evaluators=evaluators,
        progress_keys=("loss", "mim", "nce", "token_perplexity", "lr"),
    )
