"""MOCA's masking rounds (paper §3.4; official `util/misc.py`, `make_two_complementary_masks`,
`create_random_mask_mult_rounds`), made on the host with numpy.

A round's mask is a permutation `ids` of the N tokens: ids[:n_keep] are visible to the
student encoder, ids[n_keep:n_dec] are the masked tokens the decoder also predicts (M'), the
rest are never decoded. Counts are int(N·(1 − ratio)), as the code truncates. In the
complementary second round (the code's default) the visible tokens avoid all of round 1's
decoded tokens and M' is shared: from round 1's π = U₁ | M'₁ | R, round 2 is
R[:n_keep₂] | M'₁ | R[n_keep₂:] | U₁. Pure functions of (seed, step, process index).
"""

from typing import NamedTuple

import numpy as np

# Mixed into the seed, so this stream differs from any other seeded with (seed, step, ...).
_MOCA_STREAM = 0x6D6F6361  # "moca"


class Round(NamedTuple):
    """Token counts of one masking round: visible (n_keep) and decoded (n_dec ≥ n_keep)."""

    n_keep: int
    n_dec: int


def rounds(num_patches: int, mask_ratios, dec_ratios, complementary: bool) -> tuple[Round, ...]:
    """The rounds' counts; ValueError for counts the code's masks cannot have."""
    if len(mask_ratios) != len(dec_ratios) or not 1 <= len(mask_ratios) <= 2:
        raise ValueError(
            f"need one or two masking rounds with a decoder ratio each, got mask ratios "
            f"{tuple(mask_ratios)} and decoder ratios {tuple(dec_ratios)}"
        )
    out = tuple(
        Round(int(num_patches * (1.0 - r)), int(num_patches * (1.0 - d)))
        for r, d in zip(mask_ratios, dec_ratios, strict=True)
    )
    for i, (keep, dec) in enumerate(out):
        if not 0 < keep < dec <= num_patches:
            raise ValueError(
                f"round {i + 1}: {keep} visible and {dec} decoded of {num_patches} tokens; need "
                "0 < visible < decoded (mask ratio > decoder mask ratio)"
            )
    if complementary and len(out) == 2:
        (keep1, dec1), (keep2, dec2) = out
        if num_patches - dec1 < keep2 or dec2 - keep2 > dec1 - keep1:
            raise ValueError(
                f"complementary rounds need round 2's {keep2} visible tokens among round 1's "
                f"{num_patches - dec1} undecoded ones and its {dec2 - keep2} decoded masked "
                f"tokens among round 1's {dec1 - keep1}"
            )
    return out


def complementary_ids(perm: np.ndarray, sizes: tuple[Round, ...]) -> np.ndarray:
    """Round 1's permutations perm [..., N] -> both rounds' ids [..., 2, N]."""
    (keep1, dec1), (keep2, _) = sizes
    visible1, decoded1, rest = perm[..., :keep1], perm[..., keep1:dec1], perm[..., dec1:]
    second = np.concatenate([rest[..., :keep2], decoded1, rest[..., keep2:], visible1], -1)
    return np.stack([perm, second], -2)


def moca_masks(
    seed: int,
    step: int,
    batch_size: int,
    num_patches: int,
    sizes: tuple[Round, ...],
    complementary: bool = True,
    process_index: int = 0,
) -> np.ndarray:
    """int32 [batch_size, 2 views, R rounds, N]: each row a permutation, independent per
    image and view; ids[..., r, :n_keep_r] visible, [n_keep_r:n_dec_r] decoded masked."""
    rng = np.random.default_rng([_MOCA_STREAM, seed, step, process_index])
    draws = 1 if complementary and len(sizes) == 2 else len(sizes)
    perm = np.argsort(rng.random((batch_size, 2, draws, num_patches)), axis=-1)
    ids = complementary_ids(perm[:, :, 0], sizes) if draws < len(sizes) else perm
    return ids.astype(np.int32)
