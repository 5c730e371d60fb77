"""I-JEPA multi-block masks with static shapes, made on the host with numpy.

The I-JEPA code's `src/masks/multiblock.py`, `MaskCollator`: per batch one target block size
and one context block size; per image `num_targets` target rectangles and one context
rectangle with every target removed from it (re-placed while it keeps <= `min_keep` patches).
Block sizes vary per batch and context lengths per image, so index lists are padded to
per-run maxima and come with validity masks (context_idx / context_valid [B, Kc],
target_idx / target_valid [B, M, Kt]): one compilation serves the whole run.

The upstream quirks (correlated_size, exclusive_corner, truncate_context) are fixed by
default and reproduced by flags. `multiblock_masks` is a pure function of (seed, step,
process_index), like `scott_jax.masking`. Shapes, quirks and padding costs are explained in
docs/design.md#i-jepa-multi-block-masks.
"""

import functools
import math
from typing import NamedTuple

import numpy as np

# Mixed into the seed, so this stream differs from any other seeded with (seed, step, ...).
_MULTIBLOCK_STREAM = 0x696A6570  # "ijep"
#: Failed context placements before one fewer target is removed from it (upstream: 20).
TIMEOUT = 20


class MultiBlockSpec(NamedTuple):
    """`MaskCollator`'s parameters (upstream defaults); `from_config` reads `config.ijepa`.

    True reproduces an upstream quirk: `correlated_size` (one uniform draws both scale and
    aspect), `exclusive_corner` (corners in [0, grid − h), so the last row and column are
    never in a block), `truncate_context` (contexts cut to the batch's shortest, first in
    raster order). `max_context_tokens` caps Kc (a random subset of longer contexts is kept).
    """

    grid: int
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    correlated_size: bool = False
    exclusive_corner: bool = False
    truncate_context: bool = False
    max_context_tokens: int | None = None

    @classmethod
    def from_config(cls, config, grid: int) -> "MultiBlockSpec":
        c = config.ijepa
        return cls(
            grid=grid,
            num_targets=c.num_targets,
            target_scale=tuple(c.target_scale),
            target_aspect=tuple(c.target_aspect),
            context_scale=tuple(c.context_scale),
            context_aspect=tuple(c.context_aspect),
            min_keep=c.min_keep,
            correlated_size=c.correlated_size,
            exclusive_corner=c.exclusive_corner,
            truncate_context=c.truncate_context,
            max_context_tokens=c.max_context_tokens,
        )


def block_size(
    grid: int, scale: float, aspect: float, exclusive_corner: bool = False
) -> tuple[int, int]:
    """(h, w) of a block covering `scale` of the grid with aspect h/w ≈ `aspect`.

    As upstream `MaskCollator._sample_block_size`: max_keep = int(grid²·scale),
    h = round(√(max_keep·aspect)), w = round(√(max_keep/aspect)) (Python's half-to-even
    round), then capped at grid − 1 (exclusive_corner, upstream) or grid.
    """
    max_keep = int(grid * grid * scale)
    h = round(math.sqrt(max_keep * aspect))
    w = round(math.sqrt(max_keep / aspect))
    cap = grid - 1 if exclusive_corner else grid
    return max(min(h, cap), 1), max(min(w, cap), 1)


def reachable_sizes(
    grid: int,
    scale: tuple[float, float],
    aspect: tuple[float, float],
    exclusive_corner: bool = False,
) -> set[tuple[int, int]]:
    """Every (h, w) that `block_size` returns for scale and aspect in the given ranges.

    Exact, not sampled: max_keep takes the integer values int(grid²·s); for each, h and w
    are step functions of the aspect a that change only where √(max_keep·a) or
    √(max_keep/a) crosses a half-integer, so evaluating at those breakpoints, between them
    and at the ends covers every value. (Correlated sizes reach a subset of these.)
    """
    n = grid * grid
    lo, hi = aspect
    sizes = set()
    for max_keep in range(int(n * scale[0]), int(n * scale[1]) + 1):
        if max_keep == 0:
            continue
        halves = np.arange(grid + 1) + 0.5
        breaks = np.concatenate([halves**2 / max_keep, max_keep / halves**2])
        points = np.sort(np.concatenate([[lo, hi], breaks[(breaks > lo) & (breaks < hi)]]))
        points = np.concatenate([points, (points[1:] + points[:-1]) / 2])
        scale_value = (max_keep + 0.5) / n  # any scale with int(n·s) == max_keep
        sizes |= {block_size(grid, scale_value, a, exclusive_corner) for a in points}
    return sizes


def max_block_area(grid, scale, aspect, exclusive_corner=False) -> int:
    """The largest h·w a block of these ranges can have: the padded length of its index list."""
    return max(h * w for h, w in reachable_sizes(grid, scale, aspect, exclusive_corner))


@functools.lru_cache(maxsize=16)
def check_spec(spec: MultiBlockSpec) -> tuple[int, int]:
    """Validates `spec` and returns the static lengths (Kc, Kt); clear errors for bad input.

    Every reachable target block and context block must have more than min_keep patches:
    upstream loops forever on a smaller target, and the context falls back to its whole
    block when no target can be removed from it.
    """
    if spec.grid < 2:
        raise ValueError(f"multi-block masks need a patch grid of at least 2x2, got {spec.grid}")
    if spec.num_targets < 1:
        raise ValueError(f"num_targets must be >= 1, got {spec.num_targets}")
    for name in ("target_scale", "context_scale", "target_aspect", "context_aspect"):
        lo, hi = getattr(spec, name)
        upper = 1.0 if name.endswith("scale") else math.inf
        if not 0 < lo <= hi <= upper:
            raise ValueError(f"{name} must satisfy 0 < low <= high (<= 1 for scales), got {lo, hi}")
    lengths = []
    for kind in ("context", "target"):
        scale, aspect = getattr(spec, f"{kind}_scale"), getattr(spec, f"{kind}_aspect")
        areas = [h * w for h, w in reachable_sizes(spec.grid, scale, aspect, spec.exclusive_corner)]
        if min(areas) <= spec.min_keep:
            raise ValueError(
                f"a {kind} block can have {min(areas)} patches on a {spec.grid}x{spec.grid} grid, "
                f"not more than min_keep={spec.min_keep}: lower config.ijepa.min_keep, raise "
                f"config.ijepa.{kind}_scale, or use more patches (img_size / patch_size)"
            )
        lengths.append(max(areas))
    cap = spec.max_context_tokens
    if cap is not None:
        if cap <= spec.min_keep:
            raise ValueError(f"max_context_tokens={cap} must exceed min_keep={spec.min_keep}")
        lengths[0] = min(lengths[0], cap)
    return lengths[0], lengths[1]


def _draw_size(rng, grid, scale, aspect, spec: MultiBlockSpec) -> tuple[int, int]:
    """One block size for the batch: one uniform for both (correlated) or one each."""
    u_scale = rng.random()
    u_aspect = u_scale if spec.correlated_size else rng.random()
    return block_size(
        grid,
        scale[0] + u_scale * (scale[1] - scale[0]),
        aspect[0] + u_aspect * (aspect[1] - aspect[0]),
        spec.exclusive_corner,
    )


def _rectangles(rng, shape, size, grid, exclusive_corner) -> np.ndarray:
    """Random (h, w) rectangles as bool [*shape, grid, grid] masks."""
    h, w = size
    top = rng.integers(0, grid - h + (0 if exclusive_corner else 1), shape)
    left = rng.integers(0, grid - w + (0 if exclusive_corner else 1), shape)
    cells = np.arange(grid)
    rows = (cells >= top[..., None]) & (cells < top[..., None] + h)
    cols = (cells >= left[..., None]) & (cells < left[..., None] + w)
    return rows[..., :, None] & cols[..., None, :]


def _place_contexts(rng, targets, size, spec: MultiBlockSpec) -> np.ndarray:
    """Context blocks minus targets, bool [B, grid²]; re-places those with <= min_keep left."""
    batch, grid = targets.shape[0], spec.grid
    outside = ~targets  # [B, M, grid, grid]
    context = _rectangles(rng, (batch,), size, grid, spec.exclusive_corner)
    kept = context & outside.all(axis=1)
    for b in np.flatnonzero(kept.sum(axis=(1, 2)) <= spec.min_keep):
        failures = 0
        while kept[b].sum() <= spec.min_keep:
            failures += 1
            block = _rectangles(rng, (), size, grid, spec.exclusive_corner)
            removed = max(spec.num_targets - failures // TIMEOUT, 0)
            kept[b] = block & outside[b, :removed].all(axis=0)
    return kept.reshape(batch, grid * grid)


def _cap_contexts(rng, context: np.ndarray, length: int, raster: bool) -> np.ndarray:
    """Keeps at most `length` patches of each context [B, N]: the first in raster order, or a
    uniformly random subset."""
    if context.sum(axis=-1).max() <= length:
        return context
    priority = -np.arange(context.shape[-1]) if raster else rng.random(context.shape)
    priority = np.where(context, priority, -np.inf)
    rank = np.argsort(np.argsort(-priority, axis=-1, kind="stable"), axis=-1, kind="stable")
    return context & (rank < length)


def _index_lists(masks: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """bool [..., N] -> (int32 [..., length] indices in raster order, bool valid), padded.

    Padding repeats each row's first index, so even a padded slot reads a real token of
    the same set (masks must be nonempty).
    """
    order = np.argsort(~masks, axis=-1, kind="stable")[..., :length]
    valid = np.arange(length) < masks.sum(axis=-1, keepdims=True)
    return np.where(valid, order, order[..., :1]).astype(np.int32), valid


def multiblock_masks(
    spec: MultiBlockSpec, seed: int, step: int, batch_size: int, process_index: int = 0
) -> dict[str, np.ndarray]:
    """The masks of one host-local batch (see the module docstring for the arrays' layout).

    Block sizes are shared by the batch, as upstream (so, per step and host); placements
    are per image. Pure function of (spec, seed, step, batch_size, process_index).
    """
    context_length, target_length = check_spec(spec)
    rng = np.random.default_rng([_MULTIBLOCK_STREAM, seed, step, process_index])
    grid, m = spec.grid, spec.num_targets
    target_size = _draw_size(rng, grid, spec.target_scale, spec.target_aspect, spec)
    context_size = _draw_size(rng, grid, spec.context_scale, spec.context_aspect, spec)
    targets = _rectangles(rng, (batch_size, m), target_size, grid, spec.exclusive_corner)
    context = _place_contexts(rng, targets, context_size, spec)
    if spec.max_context_tokens is not None:
        context = _cap_contexts(rng, context, context_length, spec.truncate_context)
    context_idx, context_valid = _index_lists(context, context_length)
    if spec.truncate_context:
        context_valid &= np.arange(context_length) < context.sum(axis=-1).min()
    target_idx, target_valid = _index_lists(
        targets.reshape(batch_size, m, grid * grid), target_length
    )
    return dict(
        context_idx=context_idx,
        context_valid=context_valid,
        target_idx=target_idx,
        target_valid=target_valid,
    )
