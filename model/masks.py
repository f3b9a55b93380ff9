"""Torch reference mask generators: which patches the online encoder sees and which it predicts.

Masks are index tensors, not boolean maps (as in I-JEPA): `visible` [B, K] and `target` [B, N - K]
int64 indices into the row-major patch grid, sorted ascending per image, disjoint, and together
covering all N = grid * grid patches. Every image gets exactly K visible patches so a batch stacks.

All generators are vectorised over the batch (no Python loop over images), run on any device and
draw every random number from an explicit `torch.Generator` when one is given, so a seeded
generator reproduces the same masks. The DALI pipeline's masks are tested against these.

Strategies:
- "random" (the paper's): K patches uniformly at random per image, targets = the rest.
- "block": rectangular blocks are masked one after another until the masked area reaches the
  target ratio (N - K) / N; the count is then made exact (see `block_masks`).
- "multiblock" (I-JEPA style): a fixed number of target blocks; the context is the rest, trimmed
  or filled at random to exactly K patches.
For "block" and "multiblock" the visible set is the complement of the masked blocks (up to the
exact-count adjustment), and the targets are always all non-visible patches.
"""
from __future__ import annotations

import math

import torch

__all__ = ["random_masks", "block_masks", "multiblock_masks", "make_masks", "gather_patches", "STRATEGIES"]

STRATEGIES = ("random", "block", "multiblock")


def gather_patches(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens per image.

    Args:
        x: [B, N, D] tokens.
        idx: [B, K] int64 indices into N (per image).

    Returns:
        [B, K, D]: `out[b, k] = x[b, idx[b, k]]`.
    """
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _device_of(generator: torch.Generator | None, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def _check_counts(num_patches: int, num_visible: int) -> None:
    if not 0 < num_visible < num_patches:
        raise ValueError(
            f"num_visible must be between 1 and {num_patches - 1} for {num_patches} patches, got {num_visible}."
        )


def _split_by_score(score: torch.Tensor, num_visible: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `num_visible` lowest-scoring patches are visible, the rest are targets; both sorted."""
    order = torch.argsort(score, dim=1)
    visible = order[:, :num_visible].sort(dim=1).values
    target = order[:, num_visible:].sort(dim=1).values
    return visible, target


def random_masks(
    batch_size: int,
    num_patches: int,
    num_visible: int,
    *,
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random masks with an exact count (the paper: 20 of 196 visible).

    Returns:
        (visible [B, K] int64, target [B, N - K] int64), sorted ascending per image.
    """
    _check_counts(num_patches, num_visible)
    dev = _device_of(generator, device)
    noise = torch.rand(batch_size, num_patches, generator=generator, device=dev)
    return _split_by_score(noise, num_visible)


def _sample_blocks(
    batch_size: int,
    num_blocks: int,
    grid_size: int,
    min_scale: float,
    max_scale: float,
    aspect: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean maps [B, M, N] of M random rectangles per image.

    Each block covers `scale * N` patches (scale uniform in [min_scale, max_scale]) with aspect
    ratio h / w log-uniform in `aspect` (so r and 1/r are equally likely), clipped to the grid,
    at a uniformly random position where it fits entirely.
    """
    if not 0 < min_scale <= max_scale <= 1:
        raise ValueError(f"block scales must satisfy 0 < min_scale <= max_scale <= 1, got ({min_scale}, {max_scale}).")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"block aspect must be a range (lo, hi) with 0 < lo <= hi, got {tuple(aspect)}.")
    n = grid_size * grid_size
    u = torch.rand(batch_size, num_blocks, 4, generator=generator, device=device)
    area = (min_scale + (max_scale - min_scale) * u[..., 0]) * n
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    h = torch.sqrt(area * ratio).round().clamp(1, grid_size).long()
    w = torch.sqrt(area / ratio).round().clamp(1, grid_size).long()
    # Uniform top-left corner among the positions where the block fits.
    top = (u[..., 2] * (grid_size - h + 1)).long().clamp(max=grid_size - 1)
    left = (u[..., 3] * (grid_size - w + 1)).long().clamp(max=grid_size - 1)
    coords = torch.arange(grid_size, device=device)
    rows = (coords >= top[..., None]) & (coords < (top + h)[..., None])     # [B, M, G]
    cols = (coords >= left[..., None]) & (coords < (left + w)[..., None])   # [B, M, G]
    return (rows[..., :, None] & cols[..., None, :]).flatten(-2)             # [B, M, N]


def block_masks(
    batch_size: int,
    grid_size: int,
    num_visible: int,
    *,
    min_scale: float = 0.15,
    max_scale: float = 0.2,
    aspect: tuple[float, float] = (0.75, 1.5),
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise masks: blocks are added until (N - K) / N of the grid is masked, then made exact.

    Blocks are drawn in sequence; the first prefix of blocks whose union reaches N - K masked
    patches is kept. The visible set is the complement of that union, adjusted to exactly K:
    if the blocks overshoot, patches of the last block are un-masked (at random) first, so the
    earlier blocks stay whole; if they never reach the ratio, random extra patches are masked.

    Returns:
        (visible [B, K] int64, target [B, N - K] int64), sorted ascending per image.
    """
    n = grid_size * grid_size
    _check_counts(n, num_visible)
    dev = _device_of(generator, device)
    num_masked = n - num_visible
    # Enough candidate blocks to reach the ratio even with heavy overlap (capped for memory).
    num_candidates = min(4 * math.ceil(num_masked / max(1.0, min_scale * n)) + 8, 256)
    blocks = _sample_blocks(batch_size, num_candidates, grid_size, min_scale, max_scale, aspect, generator, dev)
    union = torch.cummax(blocks.to(torch.uint8), dim=1).values.bool()       # [B, M, N] union of blocks 0..m
    counts = union.sum(-1)                                                   # [B, M]
    reached = counts >= num_masked
    # First prefix that reaches the ratio (the last one if none does).
    first = torch.where(reached.any(1), reached.float().argmax(1), torch.full_like(counts[:, 0], num_candidates - 1))
    idx = first.view(-1, 1, 1).expand(-1, 1, n)
    final = torch.gather(union, 1, idx).squeeze(1)                           # [B, N]
    before = torch.gather(union, 1, (idx - 1).clamp(min=0)).squeeze(1) & (first > 0).view(-1, 1)
    # Score: unmasked in [0, 1) < patches new in the last block in [1, 2) < earlier blocks in [2, 3).
    noise = torch.rand(batch_size, n, generator=generator, device=dev)
    score = noise + final.float() + before.float()
    return _split_by_score(score, num_visible)


def multiblock_masks(
    batch_size: int,
    grid_size: int,
    num_visible: int,
    *,
    num_blocks: int = 4,
    min_scale: float = 0.15,
    max_scale: float = 0.2,
    aspect: tuple[float, float] = (0.75, 1.5),
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA-style masks: `num_blocks` target blocks; the context is the rest, made exactly K.

    The context (visible set) is the complement of the union of the blocks; if it has more than
    K patches a random K of them are kept (the dropped ones become targets), if fewer, random
    block patches are added. Targets are all non-visible patches.

    Returns:
        (visible [B, K] int64, target [B, N - K] int64), sorted ascending per image.
    """
    n = grid_size * grid_size
    _check_counts(n, num_visible)
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
    dev = _device_of(generator, device)
    blocks = _sample_blocks(batch_size, num_blocks, grid_size, min_scale, max_scale, aspect, generator, dev)
    masked = blocks.any(1)                                                   # [B, N]
    noise = torch.rand(batch_size, n, generator=generator, device=dev)
    return _split_by_score(noise + masked.float(), num_visible)


# DataConfig field name -> keyword of the block generators.
_BLOCK_KWARGS = {
    "block_min_scale": "min_scale",
    "block_max_scale": "max_scale",
    "block_aspect": "aspect",
    "num_blocks": "num_blocks",
}


def make_masks(
    strategy: str,
    batch_size: int,
    grid_size: int,
    num_visible: int,
    *,
    generator: torch.Generator | None = None,
    device=None,
    **block_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on the `data.mask` strategy: "random" | "block" | "multiblock".

    Args:
        strategy: `DataConfig.mask`.
        batch_size, grid_size, num_visible: geometry (N = grid_size ** 2).
        generator, device: where and from what the random numbers come.
        **block_kwargs: the DataConfig fields by their config names: `block_min_scale`,
            `block_max_scale`, `block_aspect`, `num_blocks` (mapped to the generators' `min_scale`,
            `max_scale`, `aspect`, `num_blocks`). Those a strategy does not use are ignored.

    Returns:
        (visible [B, K] int64, target [B, N - K] int64), sorted ascending per image.
    """
    unknown = set(block_kwargs) - set(_BLOCK_KWARGS)
    if unknown:
        raise TypeError(f"make_masks got unknown options {sorted(unknown)}; accepted: {sorted(_BLOCK_KWARGS)}.")
    kw = {_BLOCK_KWARGS[k]: v for k, v in block_kwargs.items()}
    if strategy == "random":
        return random_masks(batch_size, grid_size * grid_size, num_visible, generator=generator, device=device)
    if strategy == "block":
        kw.pop("num_blocks", None)
        return block_masks(batch_size, grid_size, num_visible, generator=generator, device=device, **kw)
    if strategy == "multiblock":
        return multiblock_masks(batch_size, grid_size, num_visible, generator=generator, device=device, **kw)
    raise ValueError(f"unknown mask strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
