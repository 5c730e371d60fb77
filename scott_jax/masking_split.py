"""SplitMask's split of the patch grid into two visible subsets A and B, drawn on the host.

SplitMask (El-Nouby et al., "Are Large-scale Datasets Necessary for Self-Supervised
Pre-training?", §4.1, §5.5) encodes each subset on its own and predicts, from each, the
tokens that subset does not see. `split_masks` is a pure function of (seed, step,
process_index) with static shapes, like `masking.keep_masks`; docs/deviations.md lists the
readings chosen where the paper is silent.

- 'block' (the paper's default): BEiT's block masking at 50 % (blocks of 16 to 75 patches,
  aspect in (0.3, 1/0.3)); A = the blocks, exactly ⌊N/2⌋ patches, B = the rest (BEiT's
  sampler may stop short; here it keeps drawing). Grids of 4x4 or less, where no 16-patch
  block fits, get a uniform split.
- 'uniform' (the paper's small-data "uniform masking of 75 %"): A and B are two disjoint
  uniform subsets of ⌈N/4⌉ patches each; the rest is predicted by both branches.
- 'complement': A is a uniform ⌈N/4⌉ subset and B its complement.
"""

import numpy as np

from scott_jax import masking

SPLITS = ("block", "uniform", "complement")
#: BEiT's `MaskingGenerator` for pre-training: `min_num_patches` 16, `max_num_patches` 75,
#: aspect ratios log-uniform in (0.3, 1/0.3) (microsoft/unilm beit `masking_generator.py`).
BEIT_MIN_BLOCK = 16
BEIT_MAX_BLOCK = 75
BEIT_ASPECT = (0.3, 1 / 0.3)
#: Grids up to this size hold no block of BEIT_MIN_BLOCK patches (a block spans < grid).
_SMALLEST_BLOCK_GRID = 5
_SPLIT_STREAM = 0x73706C74  # "splt": differs from every other (seed, step) stream


def split_sizes(grid: int, split: str) -> tuple[int, int]:
    """(|A|, |B|), the static numbers of visible tokens of the two branches."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    num_patches = grid * grid
    quarter = masking.num_kept(num_patches, 0.75)
    if split == "block":
        return num_patches // 2, num_patches - num_patches // 2
    if split == "uniform":
        return quarter, quarter
    return quarter, num_patches - quarter


def _complement(visible: np.ndarray, num_patches: int) -> np.ndarray:
    """Sorted index lists [B, K] -> sorted index lists of the other N − K patches."""
    seen = np.zeros((visible.shape[0], num_patches), bool)
    np.put_along_axis(seen, visible, True, axis=1)
    return np.nonzero(~seen)[1].reshape(visible.shape[0], -1).astype(np.int32)


def split_masks(
    seed: int, step: int, batch_size: int, grid: int, split: str, process_index: int = 0
) -> dict[str, np.ndarray]:
    """One host's split masks of a step: sorted int32 index lists over the row-major grid.

    'a_visible' [B, |A|] and 'b_visible' [B, |B|] (`split_sizes`) are the tokens each branch
    encodes; 'a_predict' [B, N − |A|] and 'b_predict' [B, N − |B|] the tokens it predicts,
    its complement. In 'block' mode A and B partition the grid, so every token is predicted
    exactly once.
    """
    n_a, n_b = split_sizes(grid, split)
    num_patches = grid * grid
    rng = np.random.default_rng([_SPLIT_STREAM, seed, step, process_index])
    if split == "block" and grid >= _SMALLEST_BLOCK_GRID:
        blocks = np.stack(
            [
                ~masking.blockwise_keep_mask(
                    rng,
                    grid,
                    0.5,
                    blocks_are="masked",
                    min_block_area=BEIT_MIN_BLOCK,
                    aspect_range=BEIT_ASPECT,
                    max_block_area=BEIT_MAX_BLOCK,
                )
                for _ in range(batch_size)
            ]
        )
        order = np.argsort(~blocks, axis=1, kind="stable")  # the blocks first, in raster order
        a, b = order[:, :n_a], order[:, n_a:]
    else:
        order = np.argsort(rng.random((batch_size, num_patches)), axis=1)
        a, b = order[:, :n_a], order[:, n_a : n_a + n_b]
    a, b = np.sort(a, axis=1).astype(np.int32), np.sort(b, axis=1).astype(np.int32)
    return {
        "a_visible": a,
        "a_predict": _complement(a, num_patches),
        "b_visible": b,
        "b_predict": _complement(b, num_patches),
    }
