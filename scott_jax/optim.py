"""AdamW with the reference's per-step LR / WD schedules, the EMA schedule and the EMA update.

Step counting (official `src/schedulers.py`; docs/design.md, Step counting): optimizer steps
are numbered k = 1..T and step k uses LR f(k) and WD g(k); the EMA update after step k uses
m(k), so the last one has m = 1.0. optax calls a schedule with its 0-based update `count`, so
every schedule here returns the value for k = count + 1. All schedules are pure functions of
the step (no state to fast-forward on resume), traceable under `jax.jit`, and return float32.

`make(config.optim, lengths)` builds a run's optax transform and the same schedules for
logging and the EMA; `run_lengths` is the one place where epochs become steps.
"""

import logging
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

#: `kind` values of `ema_schedule`: the reference's `training.ema_schedule` config key, and
#: I-JEPA's linear schedule whose first update uses i = 0 (ijepa `src/helper.py`).
EMA_KINDS = ("linear", "cosine", "linear_from_zero")
#: `kind` values of `wd_schedule`: the reference's linear one, I-JEPA's cosine one.
WD_KINDS = ("linear", "cosine")
#: `lr_kind` values of `make`: the reference's warmup-flat-cosine (`lr_schedule`) and BEiT's
#: per-iteration `cosine_scheduler` (`beit_lr_schedule`), which SplitMask follows.
LR_KINDS = ("warmup_flat_cosine", "beit")


def _check_total_steps(total_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")


def _step(count: chex.Numeric) -> jax.Array:
    """optax's 0-based `count` -> the reference's 1-based step k, as float32."""
    return (jnp.asarray(count) + 1).astype(jnp.float32)


def _linear(k: jax.Array, total: int, start: float, final: float) -> jax.Array:
    """start + (k / max(1, total))·(final − start): the reference's `LinearScheduler`."""
    return start + (k / max(1, total)) * (final - start)


def _cosine(progress: jax.Array, start: float, final: float) -> jax.Array:
    """Half-cosine from `start` (progress 0) to `final` (progress 1), clamped at `final`.

    The clamp is on the side of `final` that `start` is not on, as in the reference's
    `CosineScheduler`; it only matters for progress > 1, which training never reaches.
    """
    value = final + (start - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.maximum(value, final) if final <= start else jnp.minimum(value, final)


def lr_schedule(
    total_steps: int,
    warmup_steps: int,
    lr_start: float,
    lr_peak: float,
    lr_final: float,
    flat_pctg: float,
) -> optax.Schedule:
    """The explore–exploit LR f(count + 1): linear warmup → flat → cosine (official
    `get_warmup_flat_cosine_scheduler`).

    With W = warmup_steps, S = T − W, Fl = int(S·flat_pctg) and C = S − Fl, step k uses
    - k < W: lr_start + (k/W)·(lr_peak − lr_start), so step 1 already exceeds lr_start;
    - j = k − W < Fl: lr_peak;
    - otherwise the half-cosine from lr_peak to lr_final over (j − Fl)/max(1, C), which
      reaches lr_final at k = T (and stays at lr_peak there if flat_pctg = 1).
    Fl and C are computed in Python exactly as the reference does (`int` truncation).
    """
    _check_total_steps(total_steps)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    if not 0.0 <= flat_pctg <= 1.0:
        raise ValueError(f"flat_pctg must be in [0, 1], got {flat_pctg}")
    decay_steps = total_steps - warmup_steps
    flat_steps = int(decay_steps * flat_pctg)
    cosine_steps = decay_steps - flat_steps

    def schedule(count: chex.Numeric) -> jax.Array:
        k = _step(count)
        j = k - warmup_steps
        warmup = _linear(k, warmup_steps, lr_start, lr_peak)
        cosine = _cosine((j - flat_steps) / max(1, cosine_steps), lr_peak, lr_final)
        return jnp.where(k < warmup_steps, warmup, jnp.where(j < flat_steps, lr_peak, cosine))

    return schedule


def beit_lr_schedule(
    total_steps: int, warmup_steps: int, lr_start: float, lr_peak: float, lr_final: float
) -> optax.Schedule:
    """BEiT's `utils.cosine_scheduler` (microsoft/unilm beit), indexed by the 0-based update
    t = count, unlike the reference's k = count + 1: with W = warmup_steps and T = total_steps,
    - t < W: linspace(lr_start, lr_peak, W)[t], so the first update uses lr_start (BEiT: 0)
      and update W − 1 the peak;
    - otherwise lr_final + ½(lr_peak − lr_final)(1 + cos(π(t − W)/(T − W))).
    """
    _check_total_steps(total_steps)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )

    def schedule(count: chex.Numeric) -> jax.Array:
        t = jnp.asarray(count).astype(jnp.float32)
        warmup = lr_start + (lr_peak - lr_start) * t / max(1, warmup_steps - 1)
        cosine = _cosine((t - warmup_steps) / max(1, total_steps - warmup_steps), lr_peak, lr_final)
        return jnp.where(t < warmup_steps, warmup, cosine)

    return schedule


def lr_schedule_of(
    kind: str,
    total_steps: int,
    warmup_steps: int,
    lr_start: float,
    lr_peak: float,
    lr_final: float,
    flat_pctg: float,
) -> optax.Schedule:
    """The LR schedule of `kind` (`LR_KINDS`); BEiT's has no flat phase (flat_pctg unused)."""
    if kind == "warmup_flat_cosine":
        return lr_schedule(total_steps, warmup_steps, lr_start, lr_peak, lr_final, flat_pctg)
    if kind == "beit":
        return beit_lr_schedule(total_steps, warmup_steps, lr_start, lr_peak, lr_final)
    raise ValueError(f"unknown LR schedule kind {kind!r}; expected one of {LR_KINDS}")


def wd_schedule(
    total_steps: int, wd_start: float, wd_final: float, kind: str = "linear"
) -> optax.Schedule:
    """Weight decay g(count + 1) = wd_start + (k/T)·(wd_final − wd_start) (official).

    It starts one step above wd_start and reaches wd_final at the last step k = T.
    `kind='cosine'` is I-JEPA's `CosineWDSchedule` (ijepa `src/utils/schedulers.py`): the
    half-cosine from wd_start to wd_final over progress k/T, also stepped before the update it
    applies to.
    """
    _check_total_steps(total_steps)
    if kind == "linear":
        return lambda count: _linear(_step(count), total_steps, wd_start, wd_final)
    if kind == "cosine":
        return lambda count: _cosine(_step(count) / total_steps, wd_start, wd_final)
    raise ValueError(f"unknown weight-decay schedule kind {kind!r}; expected one of {WD_KINDS}")


def ema_schedule(
    total_steps: int, ema_start: float, ema_final: float, kind: str = "linear"
) -> optax.Schedule:
    """EMA momentum m(count + 1) for the target-encoder update after step k (official).

    `kind='linear'` (the reference config): ema_start + (k/T)·(ema_final − ema_start), so the
    first update already uses k = 1 (the reference's scheduler is never reset) and the
    last one uses ema_final exactly. `kind='cosine'` is the reference's alternative
    `CosineScheduler` over progress k/T. `kind='linear_from_zero'` is I-JEPA's momentum
    scheduler, ema_start + (i/T)·(ema_final − ema_start) with i = count = k − 1, so the
    first update uses ema_start and the last one stays just below ema_final (ijepa `src/train.py`).
    """
    _check_total_steps(total_steps)
    if kind == "linear":
        return lambda count: _linear(_step(count), total_steps, ema_start, ema_final)
    if kind == "linear_from_zero":
        return lambda count: _linear(_step(count) - 1.0, total_steps, ema_start, ema_final)
    if kind == "cosine":
        return lambda count: _cosine(_step(count) / total_steps, ema_start, ema_final)
    raise ValueError(f"unknown EMA schedule kind {kind!r}; expected one of {EMA_KINDS}")


def decay_mask(params: chex.ArrayTree) -> chex.ArrayTree:
    """Pytree of bools over `params`, True where weight decay applies (official
    `src/optimizer.py`; docs/design.md, Weight decay).

    The reference's rule on parameter names: no decay if the name contains "bias" or the
    tensor is 1-D. Here a leaf is not decayed if its key path contains "bias" or its
    ndim <= 1 (the models have no 0-d parameters, so this equals the reference's `== 1`),
    nor a learned `pos_embed` (SplitMask's, as BEiT's `no_weight_decay`).
    So LayerNorm scale / bias and Dense / conv biases are excluded, while conv and Dense
    kernels and the 3-D `mask_token` and `registers` are decayed, as in the reference.

    Constants are never decayed because they are not parameters: the sin-cos position
    embedding and the tokenizer's blur kernel are computed in the models, and the predictor
    has no (unused) mask token. This matters because torch AdamW skips gradient-less
    parameters entirely, whereas optax would decay them.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            not any(name in jax.tree_util.keystr(path) for name in ("bias", "pos_embed"))
            and jnp.ndim(leaf) > 1
        ),
        params,
    )


def make_optimizer(
    *,
    total_steps: int,
    warmup_steps: int,
    lr_start: float,
    lr_peak: float,
    lr_final: float,
    flat_pctg: float,
    wd_start: float,
    wd_final: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    wd_kind: str = "linear",
    lr_kind: str = "warmup_flat_cosine",
) -> optax.GradientTransformation:
    """torch AdamW with scheduled LR and WD: p ← p − lr_k·wd_k·p·mask − lr_k·adam_k (official).

    adam_k = m̂/(√v̂ + eps) with bias-corrected moments, as torch computes it. The decoupled
    decay is added to the Adam direction before the LR scaling, so both are multiplied by
    lr_k like torch's p·(1 − lr·wd). `add_decayed_weights` takes the WD schedule directly
    (it keeps its own step counter, in step with the LR's), and `decay_mask` limits it to
    the decayed group. The state is a tuple of NamedTuples of arrays (orbax-checkpointable).
    `wd_kind` picks the WD schedule (`wd_schedule`), `lr_kind` the LR's (`lr_schedule_of`).
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(
            wd_schedule(total_steps, wd_start, wd_final, wd_kind), mask=decay_mask
        ),
        optax.scale_by_learning_rate(
            lr_schedule_of(
                lr_kind, total_steps, warmup_steps, lr_start, lr_peak, lr_final, flat_pctg
            )
        ),
    )


def ema_update(
    target_params: chex.ArrayTree, online_params: chex.ArrayTree, momentum: chex.Numeric
) -> chex.ArrayTree:
    """θ̄ ← m·θ̄ + (1 − m)·θ over matching pytrees (official `src/mimjepa.py`).

    `momentum` is a scalar (Python float or traced array); the target keeps its dtypes.
    """
    return jax.tree.map(
        lambda t, o: (momentum * t + (1.0 - momentum) * o).astype(t.dtype),
        target_params,
        online_params,
    )


# --------------------------------------------------------------------------- run lengths


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch, ⌊num_examples / batch_size⌋ (drop_last, as the official
    loaders); an error when not even one batch fits."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(
            f"batch_size {batch_size} is larger than the dataset ({num_examples} examples): "
            "with drop_last an epoch has no full batch"
        )
    return steps


class RunLengths(NamedTuple):
    """A run's durations in optimizer steps."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def run_lengths(
    num_examples: int, batch_size: int, num_epochs: float, warmup_epochs: float
) -> RunLengths:
    """Epochs -> steps, the one place it happens: T = int(epochs · ipe), W = int(warmup · ipe)
    with ipe = `steps_per_epoch` (fractional epochs allowed, truncated like the reference).

    A warmup longer than the run (a short test run of a recipe) is clamped to the whole run,
    with a warning: the LR then rises for the entire run, as it would for its first epochs.
    """
    if warmup_epochs < 0:
        raise ValueError(f"config.optim.lr_warmup_epochs={warmup_epochs} must be >= 0")
    if warmup_epochs > num_epochs:
        logging.getLogger(__name__).warning(
            "config.optim.lr_warmup_epochs=%s is longer than the run (%s epochs): the warmup "
            "is clamped to the whole run.",
            warmup_epochs,
            num_epochs,
        )
        warmup_epochs = num_epochs
    ipe = steps_per_epoch(num_examples, batch_size)
    total = int(num_epochs * ipe)
    if total < 1:
        raise ValueError(f"num_epochs={num_epochs} gives no optimizer step ({ipe} per epoch)")
    return RunLengths(ipe, total, int(warmup_epochs * ipe))


# --------------------------------------------------------------------------- the factory


class Optimizer(NamedTuple):
    """The optax transform of a run and `schedules(count) -> {'lr', 'wd'[, 'ema'][, 'lr_<group>']}`,
    the values that the update with optax count `count` uses (for logging and the EMA)."""

    tx: optax.GradientTransformation
    schedules: Callable[[chex.Numeric], dict[str, jax.Array]]


class ConstantGroup(NamedTuple):
    """Parameters trained with a constant LR and WD beside the scheduled ones (MOCA's weight
    generators, official `main_pretrain.initialize_optimizer`). `members(params)` -> a pytree
    of bools over params, True for the group's leaves; the decay mask still applies."""

    name: str
    members: Callable[[chex.ArrayTree], chex.ArrayTree]
    lr: float
    wd: float


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch's `clip_grad_norm_`: g·min(1, max_norm / (‖g‖ + 1e-6)) over the whole tree."""

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make(
    optim_config: Mapping,
    lengths: RunLengths,
    *,
    wd_kind: str = "linear",
    ema_kind: str | None = None,
    lr_kind: str = "warmup_flat_cosine",
    first_step: int = 1,
    lr_decay_steps: int | None = None,
    clip_norm: float | None = None,
    constant_group: ConstantGroup | None = None,
) -> Optimizer:
    """AdamW and its schedules from a config's `optim` block and the run's lengths.

    `optim_config` has lr_start / lr_peak / lr_final / lr_flat_pctg, wd_start / wd_final, b1,
    b2, eps and, when `ema_kind` is given, ema_start / ema_final (configs/common.py names).
    Unknown schedule kinds fail here, before anything is compiled; `lr_kind` picks the LR
    schedule (`lr_schedule_of`), `wd_kind` the WD's, `ema_kind` the EMA's. MOCA's recipe (official
    `util/misc.py`, `compute_lr`, `adjust_weight_decay`) needs the rest: `first_step=0`
    evaluates the LR and WD at k = count (its e = t / ipe with a 0-based t, so the first LR
    is 0) instead of count + 1 (the EMA keeps count + 1, its update coming after the step);
    `lr_decay_steps` ends the cosine there instead of at the last step (the code stops
    training before the LR reaches 0); `clip_norm` clips the global gradient norm of all
    parameters first; `constant_group` trains some parameters with their own constant LR / WD.
    """
    o = optim_config
    if first_step not in (0, 1):
        raise ValueError(f"first_step must be 0 or 1, got {first_step}")
    shift = 1 - first_step
    lr = lr_schedule_of(
        lr_kind,
        lr_decay_steps or lengths.total_steps,
        lengths.warmup_steps,
        o["lr_start"],
        o["lr_peak"],
        o["lr_final"],
        o["lr_flat_pctg"],
    )
    wd = wd_schedule(lengths.total_steps, o["wd_start"], o["wd_final"], wd_kind)
    schedules = {"lr": lambda count: lr(count - shift), "wd": lambda count: wd(count - shift)}

    def adamw(lr, wd) -> optax.GradientTransformation:
        return optax.chain(
            optax.scale_by_adam(b1=o["b1"], b2=o["b2"], eps=o["eps"]),
            optax.add_decayed_weights(wd, mask=decay_mask),
            optax.scale_by_learning_rate(lr),
        )

    tx = adamw(schedules["lr"], schedules["wd"])
    if constant_group is not None:
        g = constant_group
        tx = optax.multi_transform(
            {"scheduled": tx, g.name: adamw(g.lr, g.wd)},
            lambda params: jax.tree.map(lambda m: g.name if m else "scheduled", g.members(params)),
        )
        schedules[f"lr_{g.name}"] = lambda count: jnp.full((), g.lr, jnp.float32)
    if clip_norm is not None:
        tx = optax.chain(clip_by_global_norm(clip_norm), tx)
    if ema_kind is not None:
        schedules["ema"] = ema_schedule(
            lengths.total_steps, o["ema_start"], o["ema_final"], ema_kind
        )
    return Optimizer(tx, lambda count: {name: f(count) for name, f in schedules.items()})
