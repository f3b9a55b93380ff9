"""Patch extraction with the random "patch gap" of the paper, vectorised over the batch.

A training crop is a grid of G x G cells of S = P + gap pixels. From each cell one P x P patch is
taken at an independent random offset (0..gap-1 in y and in x, per image and per cell), so
neighbouring patches never share pixels, yet the encoder still sees an ordinary G x G grid of
P-pixel patches. With gap = 0 this is the ordinary non-overlapping patchify of a G*P image.
"""
from __future__ import annotations

import torch


def random_gap_offsets(batch_size: int, grid_size: int, gap: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-cell offsets (oy, ox), each [B, G, G] int64 in 0..gap-1.

    Uses torch's default generator on `device` (the trainer checkpoints the RNG states).
    """
    oy = torch.randint(0, gap, (batch_size, grid_size, grid_size), device=device)
    ox = torch.randint(0, gap, (batch_size, grid_size, grid_size), device=device)
    return oy, ox


def extract_patches(
    images: torch.Tensor,
    grid_size: int,
    patch_size: int,
    gap: int = 0,
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cut images into a grid of pixel patches, with the random gap when `gap > 0`.

    Args:
        images: [B, C, H, W] with H = W = grid_size * (patch_size + gap).
        grid_size: G, patches per side.
        patch_size: P.
        gap: extra pixels per cell (0: plain patchify).
        offsets: optional (oy, ox) [B, G, G] int64 in 0..gap-1 (random when None and gap > 0).

    Returns:
        [B, G*G, C, P, P] patches in row-major grid order (the mask index order).
    """
    b, c, h, w = images.shape
    cell = patch_size + gap
    if h != grid_size * cell or w != grid_size * cell:
        raise ValueError(
            f"images are {h}x{w} px but grid {grid_size} x (patch {patch_size} + gap {gap}) needs "
            f"{grid_size * cell}x{grid_size * cell}; resize the crop or fix model.grid_size/patch_size/patch_gap."
        )
    # [B, C, G, S, G, S] -> [B, G, G, C, S, S]: one cell per (gy, gx); a view, no copy yet.
    cells = images.view(b, c, grid_size, cell, grid_size, cell).permute(0, 2, 4, 1, 3, 5)
    if gap > 0:
        if offsets is None:
            offsets = random_gap_offsets(b, grid_size, gap, device=images.device)
        oy, ox = offsets
        ar = torch.arange(patch_size, device=images.device)
        # Rows oy..oy+P-1 of each cell, then columns ox..ox+P-1; the indices are broadcast
        # (expanded, not materialised) over channels and the other axis.
        rows = (oy[..., None, None, None] + ar[:, None]).expand(b, grid_size, grid_size, c, patch_size, cell)
        cells = torch.gather(cells, 4, rows)
        cols = (ox[..., None, None, None] + ar).expand(b, grid_size, grid_size, c, patch_size, patch_size)
        cells = torch.gather(cells, 5, cols)
    return cells.reshape(b, grid_size * grid_size, c, patch_size, patch_size)


def unpatchify(patches: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Inverse of the gap-free `extract_patches`: [B, G*G, C, P, P] -> [B, C, G*P, G*P]."""
    b, n, c, p, _ = patches.shape
    x = patches.view(b, grid_size, grid_size, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, grid_size * p, grid_size * p)
