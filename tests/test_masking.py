"""Keep-masks (scott_jax/masking.py): exact counts, structure, reproducibility.

The oracles transcribe the official `src/masks/random_blockwise.py` (docs/design.md#masking).
"""

import math
import random

import numpy as np
import pytest

from scott_jax import masking
from scott_jax.masking import blockwise_keep_mask, keep_masks, num_kept, uniform_keep_mask

LOG_ASPECT = (math.log(0.3), math.log(3.3))


def reference_count(num_patches, ratio):
    """The official count: round (1 - ratio) * N up iff it has a fractional part."""
    x = (1 - ratio) * num_patches
    return int(x) + 1 if x - int(x) > 0 else int(x)


def neighbour_agreement(masks, grid, value=True):
    """Mean fraction of in-grid 4-neighbours of a `value` patch that are `value` too."""
    sel = masks.reshape(-1, grid, grid) == value
    same = np.zeros(sel.shape, dtype=np.int64)
    total = np.zeros(sel.shape, dtype=np.int64)
    for axis in (1, 2):
        for shift in (1, -1):
            src = [slice(None)] * 3
            dst = [slice(None)] * 3
            src[axis] = slice(shift, None) if shift > 0 else slice(None, shift)
            dst[axis] = slice(None, -shift) if shift > 0 else slice(-shift, None)
            same[tuple(dst)] += sel[tuple(src)]
            total[tuple(dst)] += 1
    return (same[sel] / total[sel]).mean()


def spec_blockwise(rnd, grid, budget):
    """A slow, independent transcription of the official `_mask` loop (test oracle).

    Returns the covered set as a [grid, grid] bool array and the number of blocks added.
    """
    covered = np.zeros((grid, grid), dtype=bool)
    added = 0
    while covered.sum() < budget:
        missing = budget - int(covered.sum())
        for _ in range(10):
            area = rnd.uniform(16, missing)
            aspect = math.exp(rnd.uniform(*LOG_ASPECT))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (h < grid and w < grid):
                continue
            top, left = rnd.randint(0, grid - h), rnd.randint(0, grid - w)
            window = covered[top : top + h, left : left + w]
            if 0 < h * w - window.sum() <= missing:
                window[...] = True
                added += 1
                break
    return covered, added


# ---------------------------------------------------------------------------
# Counts


@pytest.mark.parametrize(
    "num_patches, ratio, kept",
    [(196, 0.6, 79), (196, 0.4, 118), (196, 0.25, 147), (196, 0.5, 98), (196, 0.75, 49),
     (196, 0.0, 196), (16, 0.6, 7), (16, 0.75, 4), (4, 0.6, 2), (1, 0.5, 1)],
)  # fmt: skip
def test_num_kept_examples(num_patches, ratio, kept):
    assert num_kept(num_patches, ratio) == kept


def test_num_kept_matches_reference_float_rule():
    for num_patches in (4, 9, 16, 49, 196, 256):
        for ratio in np.arange(0, 100) / 100:
            ratio = float(ratio)
            assert num_kept(num_patches, ratio) == reference_count(num_patches, ratio), (
                num_patches,
                ratio,
            )


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_num_kept_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"0 <= ratio < 1, got"):
        num_kept(196, ratio)


@pytest.mark.parametrize("num_patches", [0, -4, 2.5, True])
def test_num_kept_rejects_bad_num_patches(num_patches):
    with pytest.raises(ValueError, match="num_patches"):
        num_kept(num_patches, 0.5)


@pytest.mark.parametrize("mask_type, blocks_are", [
    ("blockwise", "kept"), ("blockwise", "masked"), ("uniform", "kept")
])  # fmt: skip
@pytest.mark.parametrize("ratio", [0.6, 0.4, 0.25, 0.5, 0.75, 0.0, 0.9])
def test_every_mask_keeps_exactly_k_at_14x14(mask_type, blocks_are, ratio):
    kept = num_kept(196, ratio)
    for step in range(3):
        masks = keep_masks(7, step, 64, 14, ratio, mask_type, blocks_are)
        assert masks.shape == (64, 196) and masks.dtype == np.bool_
        np.testing.assert_array_equal(masks.sum(axis=1), kept)


def test_polarities_both_keep_79_of_196_at_ratio_0_6():
    for blocks_are in ("kept", "masked"):
        masks = keep_masks(0, 0, 256, 14, 0.6, "blockwise", blocks_are)
        assert set(masks.sum(axis=1).tolist()) == {79}


@pytest.mark.parametrize("grid", [2, 3, 4])
@pytest.mark.parametrize("blocks_are", ["kept", "masked"])
def test_tiny_grids_terminate_with_exact_counts(grid, blocks_are):
    """Includes the ratios where the reference sampler never returns (see test below)."""
    for ratio in (0.0, 0.1, 0.2, 0.25, 0.4, 0.5, 0.6, 0.75, 0.8):
        kept = num_kept(grid * grid, ratio)
        masks = keep_masks(3, 0, 8, grid, ratio, "blockwise", blocks_are)
        assert masks.shape == (8, grid * grid)
        np.testing.assert_array_equal(masks.sum(axis=1), kept, err_msg=f"ratio {ratio}")


def test_4x4_keeps_7_at_ratio_0_6():
    for mask_type in ("blockwise", "uniform"):
        masks = keep_masks(1, 2, 128, 4, 0.6, mask_type)
        assert set(masks.sum(axis=1).tolist()) == {7}


# ---------------------------------------------------------------------------
# Where the reference sampler can stall, and where the fallback applies


def test_shape_reachability_matches_sampling():
    """_shape_reachable is exact: it predicts the block shapes the draw produces."""
    rng = np.random.default_rng(0)
    for lo, hi in [(1, 16), (3, 16), (7, 16), (12, 16), (13, 16), (16, 16)]:
        area = np.full(200_000, float(lo)) if lo == hi else rng.uniform(lo, hi, 200_000)
        aspect = np.exp(rng.uniform(*LOG_ASPECT, 200_000))
        h = np.round(np.sqrt(area * aspect)).astype(int)
        w = np.round(np.sqrt(area / aspect)).astype(int)
        seen = set(zip(h.tolist(), w.tolist(), strict=True))
        predicted = {
            (i, j)
            for i in range(1, 20)
            for j in range(1, 20)
            if masking._shape_reachable(i, j, (lo, hi), LOG_ASPECT)
        }
        assert seen == predicted, (lo, hi)


def test_reference_sampler_stalls_only_on_tiny_grids():
    """Budgets the reference's draw can still fill, per grid (index = missing patches)."""

    def fillable(grid):
        plan = masking._block_plan(grid, 16.0, LOG_ASPECT)
        return [p for p in range(1, grid * grid + 1) if plan.reachable[p]]

    assert fillable(2) == [1, 2]  # only 1x1 blocks fit, and they need area < 2.25
    assert fillable(3) == list(range(1, 7))
    assert fillable(4) == list(range(1, 13))  # 3x3 blocks need area < 12.25
    for grid in range(5, 17):  # includes 14x14: the fallback is never used there
        assert fillable(grid) == list(range(1, grid * grid + 1)), grid


# ---------------------------------------------------------------------------
# Structure of blockwise masks


def test_blockwise_is_a_union_of_in_grid_rectangles():
    grid = 14
    cfg = masking._blockwise_config(grid, 0.6, "kept", 16, (0.3, 3.3), 10)
    blocks = []
    bits = masking._blockwise_bits(np.random.default_rng(5), 200, grid, cfg, 64, blocks)
    masks = masking._bits_to_masks(bits, grid * grid).reshape(-1, grid, grid)
    for mask, rects in zip(masks, blocks, strict=True):
        union = np.zeros((grid, grid), dtype=bool)
        for top, left, h, w in rects:
            assert 1 <= h < grid and 1 <= w < grid  # strict: at most 13 per side
            assert 0 <= top <= grid - h and 0 <= left <= grid - w
            before = union.sum()
            assert before < 79
            union[top : top + h, left : left + w] = True
            added = union.sum() - before
            assert 0 < added <= 79 - before
            if 79 - before >= 16:  # area ~ U(16, missing): no block below 3x4 = 12
                assert h * w >= 12
        np.testing.assert_array_equal(union, mask)


def test_blockwise_kept_set_is_blocky_and_masked_flag_flips_it():
    uniform = keep_masks(0, 0, 256, 14, 0.6, "uniform")
    kept = keep_masks(0, 0, 256, 14, 0.6, "blockwise", "kept")
    masked = keep_masks(0, 0, 256, 14, 0.6, "blockwise", "masked")
    # Uniform: a kept patch's neighbours are kept with probability ~ 78/195 = 0.4.
    assert abs(neighbour_agreement(uniform, 14) - 78 / 195) < 0.03
    assert neighbour_agreement(kept, 14) > 0.75
    # blocks_are='masked': the masked set is the union of blocks.
    assert neighbour_agreement(masked, 14, value=False) > 0.75
    # Exactly: it samples blocks covering N - K = 117 patches and keeps the complement,
    # i.e. the complement of the 'kept' reading at a ratio that keeps 117.
    assert num_kept(196, 0.4031) == 117
    np.testing.assert_array_equal(masked, ~keep_masks(0, 0, 256, 14, 0.4031, "blockwise"))


def test_blockwise_matches_an_independent_spec_transcription():
    """Same distribution as the official `_mask` loop written naively with Python's `random`."""
    grid, n = 14, 1500
    rnd = random.Random(0)
    oracle = [spec_blockwise(rnd, grid, 79) for _ in range(n)]
    ref_masks = np.stack([m.reshape(-1) for m, _ in oracle])
    ref_blocks = np.array([b for _, b in oracle], dtype=float)

    cfg = masking._blockwise_config(grid, 0.6, "kept", 16, (0.3, 3.3), 10)
    blocks = []
    bits = masking._blockwise_bits(np.random.default_rng(1), n, grid, cfg, 1024, blocks)
    ours = masking._bits_to_masks(bits, grid * grid)
    our_blocks = np.array([len(b) for b in blocks], dtype=float)

    se = math.sqrt(ref_blocks.var() / n + our_blocks.var() / n)
    assert abs(ref_blocks.mean() - our_blocks.mean()) < 4 * se
    assert abs(neighbour_agreement(ref_masks, grid) - neighbour_agreement(ours, grid)) < 0.02
    # Inclusive corner draws: the last row and column are kept as often as the first.
    for rows in (slice(0, 1), slice(grid - 1, grid), slice(6, 8)):
        ref = ref_masks.reshape(n, grid, grid)[:, rows].mean()
        new = ours.reshape(n, grid, grid)[:, rows].mean()
        assert abs(ref - new) < 0.05, rows


def test_every_patch_can_be_kept_or_masked():
    masks = keep_masks(11, 0, 512, 14, 0.6)
    assert masks.any(axis=0).all() and (~masks).any(axis=0).all()


def test_uniform_marginals_are_flat():
    masks = keep_masks(2, 0, 4000, 4, 0.6, "uniform")
    np.testing.assert_allclose(masks.mean(axis=0), 7 / 16, atol=0.03)


# ---------------------------------------------------------------------------
# Single-mask API, reproducibility


@pytest.mark.parametrize("make", [
    lambda rng: blockwise_keep_mask(rng, 14, 0.6),
    lambda rng: blockwise_keep_mask(rng, 14, 0.6, blocks_are="masked"),
    lambda rng: uniform_keep_mask(rng, 14, 0.6),
])  # fmt: skip
def test_single_mask_functions(make):
    first = make(np.random.default_rng(4))
    assert first.shape == (196,) and first.dtype == np.bool_ and first.sum() == 79
    np.testing.assert_array_equal(first, make(np.random.default_rng(4)))
    assert not np.array_equal(first, make(np.random.default_rng(5)))


def test_blockwise_keep_mask_custom_block_parameters():
    rng = np.random.default_rng(0)
    for _ in range(20):  # BEiT's parameters
        mask = blockwise_keep_mask(rng, 14, 0.4, min_block_area=4, aspect_range=(0.3, 1 / 0.3))
        assert mask.sum() == 118


@pytest.mark.parametrize("mask_type", ["blockwise", "uniform"])
def test_keep_masks_is_a_pure_function_of_seed_step_and_process(mask_type):
    def draw(seed=0, step=10, process_index=0):
        return keep_masks(seed, step, 16, 14, 0.6, mask_type, process_index=process_index)

    base = draw()
    for other_step in range(10):  # other calls in between do not matter (resume)
        draw(step=other_step)
    np.testing.assert_array_equal(base, draw())
    assert not np.array_equal(base, draw(step=11))
    assert not np.array_equal(base, draw(seed=1))
    assert not np.array_equal(base, draw(process_index=1))
    assert len({row.tobytes() for row in base}) == len(base)  # rows differ within a batch


# ---------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_type="random"), r"mask_type must be one of \('blockwise', 'uniform'\)"),
    (dict(blocks_are="visible"), r"blocks_are must be one of \('kept', 'masked'\)"),
    (dict(ratio=1.0), r"0 <= ratio < 1, got 1.0"),
    (dict(grid=1), r"grid must be an int >= 2, got 1"),
    (dict(grid=0, mask_type="uniform"), r"grid must be an int >= 1, got 0"),
    (dict(grid=14.0), r"grid must be an int"),
    (dict(batch_size=0), r"batch_size must be an int >= 1, got 0"),
    (dict(step=-1), r"step must be an int >= 0, got -1"),
    (dict(seed=-3), r"seed must be an int >= 0, got -3"),
    (dict(process_index=-1), r"process_index must be an int >= 0"),
])  # fmt: skip
def test_keep_masks_rejects_bad_inputs(kwargs, match):
    args = dict(seed=0, step=0, batch_size=4, grid=14, ratio=0.6) | kwargs
    with pytest.raises(ValueError, match=match):
        keep_masks(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_block_area=0), "min_block_area must be > 0"),
    (dict(aspect_range=(3.3, 0.3)), "aspect_range must satisfy 0 < low <= high"),
    (dict(aspect_range=(0.0, 3.3)), "aspect_range"),
    (dict(max_attempts=0), "max_attempts must be an int >= 1"),
    (dict(blocks_are="both"), "blocks_are must be one of"),
])  # fmt: skip
def test_blockwise_keep_mask_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        blockwise_keep_mask(np.random.default_rng(0), 14, 0.6, **kwargs)
