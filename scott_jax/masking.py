"""Keep-masks for MIM-JEPA: blockwise (BEiT-style) and uniform, drawn on the host.

A keep-mask is a bool vector over the row-major patch grid (token n = r * grid + c);
True = keep (visible, context), False = masked (a loss target), as in the official code
(`src/masks/mask_generator.py`, `MaskGenerator`).

Every mask keeps exactly ``num_kept(grid**2, ratio)`` patches, so the context encoder always
sees a static number of tokens inside jit. Masks are made with numpy, not inside the jitted
step (the blockwise sampler is a rejection loop with data-dependent control flow).
``keep_masks`` is a pure function of ``(seed, step, process_index)``: a resumed run redraws
the masks of the uninterrupted run and every host draws its own. The sampling rules, the
reference's quirks and the bitset speed-up are explained in docs/design.md#masking.
"""

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

MASK_TYPES = ("blockwise", "uniform")
BLOCKS_ARE = ("kept", "masked")
# The reference's blockwise parameters (official `src/masks/random_blockwise.py`, `_mask`).
MIN_BLOCK_AREA = 16.0
ASPECT_RANGE = (0.3, 3.3)
MAX_ATTEMPTS = 10

# Mixed into the seed of `keep_masks`, so that its stream differs from any other
# stream of the run that is also seeded with (seed, step, process_index).
_MASK_STREAM = 0x6D61736B  # "mask"


def num_kept(num_patches: int, ratio: float) -> int:
    """Number of kept (visible) patches, K = ceil((1 - ratio) * num_patches).

    As the official `get_random_blockwise_mask` / `get_random_uniform_mask` count it.

    ``ratio`` is the masked fraction. The reference rounds the kept count up in float64,
    so 0.6 of 196 keeps 79 (117 masked, 59.7 %) and 0.6 of 16 keeps 7; products that are
    exact integers (ratio 0.25, 0.5, 0.75 of 196) are kept as they are. ratio < 1 makes
    the product positive, so at least one patch is always kept.
    """
    if isinstance(num_patches, bool) or not isinstance(num_patches, int | np.integer):
        raise ValueError(f"num_patches must be an int, got {num_patches!r}")
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must satisfy 0 <= ratio < 1, got {ratio}")
    return math.ceil((1.0 - ratio) * int(num_patches))


# ---------------------------------------------------------------------------
# Blockwise sampler (official `src/masks/random_blockwise.py`; docs/design.md#masking)


class _BlockPlan(NamedTuple):
    """Per-(grid, area, aspect) tables, built once and cached."""

    shape_bits: tuple[tuple[int, ...], ...]  # [h][w] -> bits of an h x w block at (0, 0)
    # [P] -> True if, while P patches are missing, the reference's draw yields with positive
    # probability a block that fits the grid and holds at most P patches; then every
    # state can progress. Where False, only a block overlapping set patches could be
    # accepted; with the default area and aspect no block fits the grid at all there.
    reachable: tuple[bool, ...]
    # [P] -> block shapes (h, w) that fit the grid with h * w <= P; used only where
    # `reachable[P]` is False (the fallback below).
    fallback_shapes: tuple[tuple[tuple[int, int], ...], ...]


def _overlap(a0: float, a1: float, b0: float, b1: float) -> bool:
    """Whether the open interval (a0, a1) meets [b0, b1] in a set of positive measure.

    A degenerate [b0, b0] (a fixed value) counts when b0 lies strictly inside (a0, a1).
    """
    if b0 == b1:
        return a0 < b0 < a1
    return max(a0, b0) < min(a1, b1)


def _shape_reachable(
    h: int, w: int, area: tuple[float, float], log_aspect: tuple[float, float]
) -> bool:
    """Whether an h x w block comes out of the reference's draw with positive probability.

    The reference sets h = round(sqrt(A * R)), w = round(sqrt(A / R)) with A uniform on
    ``area`` and log R uniform on ``log_aspect``. With u = log sqrt(A R), v = log sqrt(A / R)
    the block is h x w when (u, v) lies in the box (log(h - 1/2), log(h + 1/2)) x
    (log(w - 1/2), log(w + 1/2)); the draw covers the rectangle u + v in log(area),
    u - v in log_aspect. Both are convex polygons, so they meet in a set of positive
    measure iff their projections overlap on each of the four edge normals (separating
    axis theorem): u, v, u + v and u - v. Rounding ties only matter on a null set.
    """
    u0, u1 = math.log(h - 0.5), math.log(h + 0.5)
    v0, v1 = math.log(w - 0.5), math.log(w + 0.5)
    s0, s1 = math.log(area[0]), math.log(area[1])
    d0, d1 = log_aspect
    return (
        _overlap(u0 + v0, u1 + v1, s0, s1)
        and _overlap(u0 - v1, u1 - v0, d0, d1)
        and _overlap(u0, u1, (s0 + d0) / 2, (s1 + d1) / 2)
        and _overlap(v0, v1, (s0 - d1) / 2, (s1 - d0) / 2)
    )


@functools.lru_cache(maxsize=64)
def _block_plan(grid: int, min_block_area: float, log_aspect: tuple[float, float]) -> _BlockPlan:
    """Tables for `_blockwise_bits`: block bit patterns and, per budget, reachability."""
    num_patches = grid * grid
    shape_bits = tuple(
        tuple(sum(((1 << w) - 1) << (i * grid) for i in range(h)) for w in range(grid))
        for h in range(grid)
    )
    fits = [(h, w) for h in range(1, grid) for w in range(1, grid)]  # strict h, w < grid
    reachable = [False]
    fallback_shapes: list[tuple[tuple[int, int], ...]] = [()]
    for budget in range(1, num_patches + 1):
        area = (min(budget, min_block_area), max(budget, min_block_area))
        small = tuple((h, w) for h, w in fits if h * w <= budget)
        reachable.append(any(_shape_reachable(h, w, area, log_aspect) for h, w in small))
        fallback_shapes.append(small)
    return _BlockPlan(shape_bits, tuple(reachable), tuple(fallback_shapes))


class _BlockwiseConfig(NamedTuple):
    plan: _BlockPlan
    budget: int  # patches the blocks cover
    invert: bool  # True when the blocks are the masked patches
    min_block_area: float
    log_aspect: tuple[float, float]
    max_attempts: int
    max_block_area: int  # BEiT's `max_num_patches`; num_patches when uncapped


def _draw_attempts(
    rng: np.random.Generator, n: int, log_aspect: tuple[float, float]
) -> list[list[float]]:
    """Random numbers for n block attempts: [n, 4] rows (u_area, sqrt(aspect), u_top, u_left).

    One numpy call per chunk of attempts, and the aspect transform done in numpy, keep
    the per-attempt Python work small. An attempt whose block does not fit leaves its
    u_top, u_left unused.
    """
    u = rng.random((n, 4))
    u[:, 1] = np.exp(0.5 * (log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[:, 1]))
    return u.tolist()


def _blockwise_bits(
    rng: np.random.Generator,
    batch_size: int,
    grid: int,
    cfg: _BlockwiseConfig,
    chunk: int,
    blocks: list[list[tuple[int, int, int, int]]] | None = None,
) -> list[int]:
    """``batch_size`` unions of random rectangles, each covering exactly ``cfg.budget`` patches.

    Returns one int per mask whose bit r * grid + c is patch (r, c). If ``blocks`` is a
    list, one list of the accepted (top, left, h, w) per mask is appended to it.

    The official `_mask` loop (docs/design.md#masking). Outer loop: while fewer than ``budget``
    patches are set, try to add a block with the missing count P as the limit (BEiT caps P at
    ``cfg.max_block_area``, its `max_num_patches`, so one block never exceeds it). A call makes up
    to ``max_attempts`` attempts and stops at the first accepted block: area ~ U(min_block_area,
    P) (which lies in [P, min_block_area] when P is smaller), log aspect ~ U(log aspect_range),
    h and w the half-to-even rounded sides sqrt(area * aspect) and sqrt(area / aspect), kept
    only if h < grid and w < grid (strict, so a block spans at most grid - 1), top-left corner
    uniform over all in-grid positions (inclusive, so the last row and column are reachable),
    accepted iff it adds between 1 and P new patches. Overlaps are allowed, so the last blocks
    fill the budget exactly.
    """
    shape_bits, reachable, fallback_shapes = cfg.plan
    budget, min_area, max_attempts = cfg.budget, cfg.min_block_area, cfg.max_attempts
    out = []
    attempts: list[list[float]] = []
    i = n = 0
    for _ in range(batch_size):
        bits = count = 0
        accepted = []
        while count < budget:
            missing = min(budget - count, cfg.max_block_area)
            span = missing - min_area
            faithful = reachable[missing]
            for _ in range(max_attempts):
                if i == n:
                    attempts, i, n = _draw_attempts(rng, chunk, cfg.log_aspect), 0, chunk
                u_area, sqrt_aspect, u_top, u_left = attempts[i]
                i += 1
                if faithful:
                    sqrt_area = math.sqrt(min_area + span * u_area)
                    h = round(sqrt_area * sqrt_aspect)
                    w = round(sqrt_area / sqrt_aspect)
                    if h >= grid or w >= grid:
                        continue
                else:
                    # NOTE(deviation): the reference loops forever here. Its blocks are at
                    # most (grid - 1) x (grid - 1) and, while fewer than min_block_area
                    # patches are missing, their area is drawn from [missing,
                    # min_block_area]; when no block that fits and holds at most `missing`
                    # patches can come out of that draw, no block is ever accepted. With
                    # the default area and aspect this happens only on grids up to 4x4:
                    # 2x2 when >= 3 patches are missing (with blocks_are='kept': any
                    # ratio < 0.5), 3x3 at >= 7 (< 1/3), 4x4 at >= 13 (< 0.25). For
                    # grid >= 5 every budget is reachable, so 14x14 masks follow the
                    # reference. Here the shape is drawn uniformly among those that fit
                    # and hold at most `missing` patches (1x1 always does): it terminates.
                    shapes = fallback_shapes[missing]
                    h, w = shapes[int(u_area * len(shapes))]
                top = int(u_top * (grid - h + 1))
                left = int(u_left * (grid - w + 1))
                rect = shape_bits[h][w] << (top * grid + left)
                new = h * w - (bits & rect).bit_count()
                if 0 < new <= missing:
                    bits |= rect
                    count += new
                    accepted.append((top, left, h, w))
                    break
        out.append(bits)
        if blocks is not None:
            blocks.append(accepted)
    return out


def _bits_to_masks(rows: Sequence[int], num_patches: int) -> np.ndarray:
    """Int bitsets (bit n = token n) -> bool array [len(rows), num_patches]."""
    nbytes = (num_patches + 7) // 8
    buf = b"".join(r.to_bytes(nbytes, "little") for r in rows)
    packed = np.frombuffer(buf, dtype=np.uint8).reshape(len(rows), nbytes)
    return np.unpackbits(packed, axis=1, count=num_patches, bitorder="little").astype(bool)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _blockwise_config(
    grid: int,
    ratio: float,
    blocks_are: str,
    min_block_area: float,
    aspect_range: tuple[float, float],
    max_attempts: int,
    max_block_area: int | None = None,
) -> _BlockwiseConfig:
    # A block spans at most grid - 1 patches per side, so a 1x1 grid has no block at all.
    grid = _check_int("grid", grid, 2)
    kept = num_kept(grid * grid, ratio)
    if blocks_are not in BLOCKS_ARE:
        raise ValueError(f"blocks_are must be one of {BLOCKS_ARE}, got {blocks_are!r}")
    if not min_block_area > 0:
        raise ValueError(f"min_block_area must be > 0, got {min_block_area}")
    low, high = (float(a) for a in aspect_range)
    if not 0 < low <= high:
        raise ValueError(f"aspect_range must satisfy 0 < low <= high, got {aspect_range}")
    max_attempts = _check_int("max_attempts", max_attempts, 1)
    log_aspect = (math.log(low), math.log(high))
    min_block_area = float(min_block_area)
    if blocks_are == "kept":
        budget, invert = kept, False
    else:
        # NOTE(deviation): blocks_are='masked' is the paper/BEiT reading
        # (docs/design.md#masking): the blocks are the masked patches (budget N - K) and the
        # kept set is their complement. K stays ceil((1 - ratio) N) for both readings, so the
        # number of context tokens (a static shape) does not depend on this flag.
        budget, invert = grid * grid - kept, True
    cap = grid * grid if max_block_area is None else _check_int("max_block_area", max_block_area, 1)
    plan = _block_plan(grid, min_block_area, log_aspect)
    return _BlockwiseConfig(plan, budget, invert, min_block_area, log_aspect, max_attempts, cap)


def _blockwise_batch(
    rng: np.random.Generator, batch_size: int, grid: int, cfg: _BlockwiseConfig, chunk: int
) -> np.ndarray:
    """[batch_size, grid * grid] bool keep-masks."""
    masks = _bits_to_masks(_blockwise_bits(rng, batch_size, grid, cfg, chunk), grid * grid)
    return ~masks if cfg.invert else masks


def blockwise_keep_mask(
    rng: np.random.Generator,
    grid: int,
    ratio: float,
    blocks_are: str = "kept",
    min_block_area: float = MIN_BLOCK_AREA,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
    max_attempts: int = MAX_ATTEMPTS,
    max_block_area: int | None = None,
) -> np.ndarray:
    """One blockwise keep-mask, [grid * grid] bool, row-major, True = keep.

    The official `get_random_blockwise_mask`. Exactly K = num_kept(grid**2, ratio) entries
    are True.

    blocks_are='kept' (default, the reference's behaviour): rectangles are added until they
    cover K patches; they are the visible context and the loss targets are the complement.
    blocks_are='masked' (the paper/BEiT reading): the rectangles cover the N - K masked
    patches and the kept set is the complement.

    The defaults (area >= 16, aspect in [0.3, 3.3], 10 attempts per call) are the
    reference's; BEiT uses a minimum area of 4 and aspect [0.3, 1/0.3]. max_attempts
    is kept for parity but cannot change the masks: a call whose attempts all fail
    leaves the mask as it was, and the outer loop calls again with the same budget.
    max_block_area caps the patches one block may add (BEiT's `max_num_patches`; None: no
    cap, the reference's behaviour).
    """
    cfg = _blockwise_config(
        grid, ratio, blocks_are, min_block_area, aspect_range, max_attempts, max_block_area
    )
    return _blockwise_batch(rng, 1, int(grid), cfg, chunk=32)[0]


def _uniform_batch(
    rng: np.random.Generator, batch_size: int, grid: int, ratio: float
) -> np.ndarray:
    """[batch_size, grid * grid] bool with K uniformly chosen True per row.

    The official `get_random_uniform_mask`.
    """
    num_patches = _check_int("grid", grid, 1) ** 2
    kept = num_kept(num_patches, ratio)
    # The K smallest of N iid random scores sit at a uniformly random K-subset. The
    # token index in the low bits makes the scores distinct, so the threshold keeps
    # exactly K (a per-row np.partition is several times faster than argpartition here).
    shift = num_patches.bit_length()
    scores = rng.integers(0, 1 << (64 - shift), (batch_size, num_patches), dtype=np.uint64)
    scores = (scores << np.uint64(shift)) | np.arange(num_patches, dtype=np.uint64)
    kth = np.partition(scores, kept - 1, axis=1)[:, kept - 1 : kept]
    return scores <= kth


def uniform_keep_mask(rng: np.random.Generator, grid: int, ratio: float) -> np.ndarray:
    """One uniform keep-mask, [grid * grid] bool: K = num_kept patches chosen uniformly.

    The reference returns float64 (`get_random_uniform_mask`); the dtype has no numerical
    effect, so masks are bool here.
    """
    return _uniform_batch(rng, 1, grid, ratio)[0]


def keep_masks(
    seed: int,
    step: int,
    batch_size: int,
    grid: int,
    ratio: float,
    mask_type: str = "blockwise",
    blocks_are: str = "kept",
    process_index: int = 0,
) -> np.ndarray:
    """Keep-masks for one host's share of a training batch, [batch_size, grid * grid] bool.

    A pure function of its arguments: the numpy generator is seeded from (seed, step,
    process_index), so resuming at step s redraws exactly the masks of step s with no
    generator state to checkpoint (the reference draws from Python's global `random`), and
    each host draws different masks. Every row keeps exactly num_kept(grid**2, ratio)
    patches, the static context length.

    mask_type: 'blockwise' (the reference's sampler and block parameters; see
    `blockwise_keep_mask` for blocks_are) or 'uniform' (blocks_are ignored).
    """
    seed = _check_int("seed", seed, 0)
    step = _check_int("step", step, 0)
    process_index = _check_int("process_index", process_index, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    rng = np.random.default_rng([_MASK_STREAM, seed, step, process_index])
    if mask_type == "uniform":
        return _uniform_batch(rng, batch_size, grid, ratio)
    cfg = _blockwise_config(grid, ratio, blocks_are, MIN_BLOCK_AREA, ASPECT_RANGE, MAX_ATTEMPTS)
    return _blockwise_batch(rng, batch_size, int(grid), cfg, chunk=1024)
