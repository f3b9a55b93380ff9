"""The pipeline -> model contract."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One batch on the process's device.

    Attributes:
        images: [B, 3, H, W] float, normalised; H = W = grid * (patch + gap) in training,
            grid * patch in evaluation.
        visible: [B, K] int64 patch indices (row-major over the grid) the online encoder sees.
        target: [B, N - K] int64 patch indices to predict; disjoint from `visible`.
        labels: [B] int64 class index, or None when the dataset has no labels (-1 per sample
            when only some samples have one).
        keys: the samples' keys (for exact-resume checks and debugging), or None.
    """

    images: torch.Tensor
    visible: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor | None = None
    keys: list[str] | None = field(default=None, repr=False)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.images), move(self.visible), move(self.target), move(self.labels), self.keys)

    def __len__(self) -> int:
        return int(self.images.shape[0])
