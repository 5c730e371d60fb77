"""MIM-JEPA objective (official `src/mimjepa.py`): normalised targets and masked Smooth-L1;
I-JEPA's block regression loss (I-JEPA code: `src/train.py`, `loss_fn`); and SplitMask's
cross-entropy over visual words and symmetric InfoNCE (El-Nouby et al., §4.2-4.3).

The target encoder sees the second view unmasked; its features are layer-normalised
without affine parameters and detached. The loss compares the predictor's output with
them only at masked positions (keep_mask == 0).
"""

import chex
import jax
import jax.numpy as jnp

from scott_jax.models.tokenizers import kept_patches
from scott_jax.models.transformer import layer_norm


def target_features(features: jax.Array) -> jax.Array:
    """Regression targets: non-affine LayerNorm over D (eps 1e-5), no gradient.

    features [B, N, D] (target-encoder output on the unmasked target view) -> [B, N, D].
    As `mimjepa_training` in the official `src/mimjepa.py`; the same normalised features feed
    the online probe (docs/design.md#objective).
    """
    return jax.lax.stop_gradient(layer_norm(features))


def smooth_l1(diff: jax.Array) -> jax.Array:
    """Element-wise Smooth-L1 with β = 1: 0.5·d² where |d| < 1, else |d| − 0.5."""
    abs_diff = jnp.abs(diff)
    return jnp.where(abs_diff < 1.0, 0.5 * diff * diff, abs_diff - 0.5)


def masked_smooth_l1(pred: jax.Array, target: jax.Array, keep_mask: chex.Array) -> jax.Array:
    """The reference's `ReconstructionLoss` (`src/mimjepa.py`): a float32 scalar.

    pred, target [B, N, D]; keep_mask [B, N] (1 = visible, 0 = masked, any dtype).
    With drop = 1 − keep:
      ℓ = SmoothL1_β=1((pred − target)·drop)                             # [B, N, D]
      per token  = (Σ_D ℓ + 1e-8) / D                                    # [B, N]
      per sample = Σ_N per token / (Σ_N drop + 1e-8)                     # [B]
      loss       = mean over B.
    ((pred − target)·drop equals the reference's pred·drop − target·drop for a 0/1 mask.)
    Kept positions give ℓ = 0 (but still add their 1e-8/D), so this is the mean over masked
    tokens and channels, and pred receives gradient only at masked positions (a sample with
    no masked token would add N/D, but masks have a static, nonzero count). Computed in
    float32 whatever the input dtype: sums over N·D terms lose too much in bfloat16.
    """
    if pred.shape != target.shape or pred.ndim != 3 or keep_mask.shape != pred.shape[:2]:
        raise ValueError(
            f"expected pred and target [B, N, D] and keep_mask [B, N], got {pred.shape}, "
            f"{target.shape} and {keep_mask.shape}"
        )
    drop = 1.0 - jnp.asarray(keep_mask, jnp.float32)
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    elementwise = smooth_l1(diff * drop[..., None])
    per_token = (elementwise.sum(-1) + 1e-8) / pred.shape[-1]
    per_sample = per_token.sum(-1) / (drop.sum(-1) + 1e-8)
    return per_sample.mean()


def masked_tokens(keep_mask: chex.Array, num_masked: int) -> tuple[jax.Array, jax.Array]:
    """keep_mask [B, N] -> (index [B, num_masked] int32, exact [B] bool).

    index lists each row's masked tokens (keep_mask == 0) in row-major order; exact flags
    the rows that mask exactly `num_masked` tokens (otherwise index is cut, or padded with N).
    """
    masked = jnp.asarray(keep_mask) == 0
    index, _ = kept_patches(masked, num_masked)
    return index, jnp.count_nonzero(masked, axis=1) == num_masked


def smooth_l1_at_masked(pred: jax.Array, target: jax.Array, num_tokens: int) -> jax.Array:
    """`masked_smooth_l1` computed from the masked tokens alone: a float32 scalar.

    pred, target [B, M, D] at *all* M masked tokens of each row (`masked_tokens`), of
    num_tokens N. In the reference formula each of the N − M kept tokens adds 1e-8/D to its
    row's sum; that constant is added here, so the value equals `masked_smooth_l1` on the
    full [B, N, D] arrays up to float summation order, and so do the gradients.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"expected pred and target [B, M, D], got {pred.shape}, {target.shape}")
    num_masked, dim = pred.shape[1:]
    elementwise = smooth_l1(pred.astype(jnp.float32) - target.astype(jnp.float32))
    per_token = (elementwise.sum(-1) + 1e-8) / dim
    kept_terms = (num_tokens - num_masked) * 1e-8 / dim
    per_sample = (per_token.sum(-1) + kept_terms) / (num_masked + 1e-8)
    return per_sample.mean()


#: `config.ijepa.loss` values: the official code's Smooth-L1 and the paper's squared L2.
IJEPA_LOSSES = ("smooth_l1", "l2")


def block_regression_loss(
    pred: jax.Array, target: jax.Array, valid: chex.Array, kind: str = "smooth_l1"
) -> jax.Array:
    """I-JEPA's loss: mean over valid target tokens and channels, float32 scalar.

    pred, target [B, M, K, D] (predictions and LN'd target features at the M target blocks);
    valid [B, M, K] (False on padding). `kind='smooth_l1'` (β = 1) is the I-JEPA code's
    `F.smooth_l1_loss` (`src/train.py`, `loss_fn`), 'l2' the squared error the I-JEPA paper
    writes (per element, so its scale matches Smooth-L1 near zero). With no padding this is
    the plain mean over all elements, as upstream, whose index lists have equal lengths.
    """
    if kind not in IJEPA_LOSSES:
        raise ValueError(f"unknown I-JEPA loss {kind!r}; expected one of {IJEPA_LOSSES}")
    if pred.shape != target.shape or pred.ndim != 4 or valid.shape != pred.shape[:3]:
        raise ValueError(
            f"expected pred and target [B, M, K, D] and valid [B, M, K], got {pred.shape}, "
            f"{target.shape} and {valid.shape}"
        )
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "smooth_l1":
        elementwise = smooth_l1(diff)
    else:
        elementwise = diff * diff
    weight = jnp.asarray(valid, jnp.float32)
    return (elementwise.sum(-1) * weight).sum() / (weight.sum() * pred.shape[-1])


# --------------------------------------------------------------------------- SplitMask


def mim_cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Masked-image-modelling loss (BEiT's `CrossEntropyLoss` over the predicted tokens).

    logits [B, P, V] at the P predicted positions, tokens int [B, P] their visual words ->
    the mean cross-entropy, a float32 scalar (computed in float32 whatever the input dtype).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, tokens[..., None], axis=-1).mean()


#: `negatives` of `info_nce`: the other branch's descriptors of the other images (SplitMask
#: Eq. 2), or also the same branch's (SimCLR's NT-Xent, 2B − 2 negatives).
NCE_NEGATIVES = ("other_branch", "simclr")


def info_nce(
    za: jax.Array, zb: jax.Array, tau: float, negatives: str = "other_branch"
) -> jax.Array:
    """SplitMask's symmetrised InfoNCE (paper §4.3, Eq. 2) between the two branches'
    descriptors za, zb [B, D] of the same B images; a float32 scalar.

    ẑ = z/‖z‖, logits ẑ_a ẑ_bᵀ/τ, cross-entropy with the matching image as the positive, in
    both directions, averaged. 'simclr' adds the same branch's other images as negatives.
    """
    if negatives not in NCE_NEGATIVES:
        raise ValueError(f"unknown negatives {negatives!r}; expected one of {NCE_NEGATIVES}")
    za, zb = (z.astype(jnp.float32) for z in (za, zb))
    za = za / jnp.maximum(jnp.linalg.norm(za, axis=-1, keepdims=True), 1e-12)
    zb = zb / jnp.maximum(jnp.linalg.norm(zb, axis=-1, keepdims=True), 1e-12)
    batch = za.shape[0]
    positives = jnp.sum(za * zb, -1) / tau  # [B]
    cross = za @ zb.T / tau
    candidates_a, candidates_b = cross, cross.T  # rows: a's (b's) anchors over the other branch
    if negatives == "simclr":
        off_diagonal = ~jnp.eye(batch, dtype=bool)
        same_a = jnp.where(off_diagonal, za @ za.T / tau, -jnp.inf)
        same_b = jnp.where(off_diagonal, zb @ zb.T / tau, -jnp.inf)
        candidates_a = jnp.concatenate([cross, same_a], axis=1)
        candidates_b = jnp.concatenate([cross.T, same_b], axis=1)
    loss_a = jax.nn.logsumexp(candidates_a, axis=1) - positives
    loss_b = jax.nn.logsumexp(candidates_b, axis=1) - positives
    return 0.5 * (loss_a.mean() + loss_b.mean())
