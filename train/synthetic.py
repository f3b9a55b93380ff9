"""Device-resident synthetic batches behind the pipeline's Loader interface (`data.loader=synthetic`).

The "ideal" input pipeline: a small pool of random images generated once on the device, cycled
with fresh masks, so a step never waits for data. It is what the trainer benchmark compares the
real pipeline against (the data-wait share of an ideal loader is ~0) and what measures the
trainer's own overhead on a GPU. It learns nothing useful; do not pretrain on it.

Deterministic and exactly resumable: batch `i` of epoch `e` on rank `r` depends only on
(seed, r, e, i), and the state is just (epoch, index).
"""
from __future__ import annotations

from typing import Iterator

import torch

from lmim.model.masks import make_masks
from lmim.pipeline.batch import Batch

__all__ = ["SyntheticLoader"]


class SyntheticLoader:
    """Args:
        batch_size: images per batch (per process).
        image_size: side of the square images (grid * (patch + gap) for training).
        grid_size, num_visible, mask: mask geometry, as in `DataConfig`.
        batches_per_epoch: `len(loader)`.
        pool: distinct images generated once (cycled with different masks).
        device: where batches live.
        seed, rank: stream identity.
        num_classes: labels are `index % num_classes` so k-NN code paths can run.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        image_size: int,
        grid_size: int,
        num_visible: int,
        mask: str = "random",
        batches_per_epoch: int = 100,
        pool: int = 4,
        device: torch.device | str | None = None,
        seed: int = 0,
        rank: int = 0,
        num_classes: int = 10,
        channels: int = 3,
    ):
        self.batch_size, self.grid_size, self.num_visible, self.mask = batch_size, grid_size, num_visible, mask
        self.batches_per_epoch = batches_per_epoch
        self.device = torch.device(device or "cpu")
        self.seed, self.rank, self.num_classes = seed, rank, num_classes
        gen = torch.Generator(device="cpu").manual_seed(seed * 1000003 + rank)
        self._images = torch.randn(pool, batch_size, channels, image_size, image_size, generator=gen).to(self.device)
        self.epoch = 0
        self._index = 0  # batches of the current epoch already yielded

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _batch(self, index: int) -> Batch:
        gen = torch.Generator(device="cpu").manual_seed(hash((self.seed, self.rank, self.epoch, index)) & (2**62))
        visible, target = make_masks(
            self.mask, self.batch_size, self.grid_size, self.num_visible, generator=gen
        )
        labels = (torch.arange(self.batch_size) + index * self.batch_size) % self.num_classes
        return Batch(
            self._images[index % len(self._images)],
            visible.to(self.device, non_blocking=True),
            target.to(self.device, non_blocking=True),
            labels.to(self.device, non_blocking=True),
            None,
        )

    def __iter__(self) -> Iterator[Batch]:
        while self._index < self.batches_per_epoch:
            batch = self._batch(self._index)
            self._index += 1
            yield batch
        self.epoch += 1
        self._index = 0

    def batches_left(self) -> int:
        """Batches still to come in the current epoch."""
        return self.batches_per_epoch - self._index

    @property
    def epochs_done(self) -> float:
        """Epochs consumed, fractions included (what a log's `epoch` is)."""
        return self.epoch + self._index / self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self._index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._index = int(state["epoch"]), int(state["index"])

    def close(self) -> None:
        self._images = self._images[:0]
