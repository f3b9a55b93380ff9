"""The contract between the `Loader` and its backends (DALI: `lmim.pipeline.dali`; PyTorch:
`lmim.pipeline.torch_loader`): a backend only turns a plan into image tensors.

A backend is given
- an `EpochPlan`: the batches to make, from `start` on (for each position, a shard and a sample
  in it) and, in training, the crop plan that gives each batch its windows and flips;
- a `ShardSource` (`lmim.pipeline.source`): each shard's name and metadata, a local shard's tar
  and image spans, a remote shard's whole-shard fetch;
- an `ImageSpec`: what the images must look like, and the threads and device to make them with.
It yields one `DecodedBatch` per batch, in order, and fails with the typed errors of
`lmim.pipeline.errors`, which say where: `ShardError` (a shard), `SampleError` (a sample, with its
position), `BatchFailed` (a batch the backend cannot pin on one sample). The loader applies the
policy (data.on_error), the masks and the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np

from lmim.pipeline.order import crop_windows

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Backend", "CropPlan", "DecodedBatch", "EpochPlan", "ImageSpec"]


@dataclass(frozen=True)
class CropPlan:
    """RandomResizedCrop windows and flips of training batches, a pure function of (epoch, batch)."""

    seed: int
    rank: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float

    def windows(self, epoch: int, batch: int, widths: np.ndarray,
                heights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(anchors [B, 2] x, y; shapes [B, 2] w, h; flips [B]) of batch `batch` (`lmim.pipeline.order.crop_windows`)."""
        return crop_windows(widths, heights, self.seed, epoch, self.rank, batch, self.scale, self.ratio, self.hflip)


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch still has to read: batches `start`, `start + 1`, ... of `batch_size` positions.

    `shards[p]` and `samples[p]` are the shard (manifest index) and the sample (index in that
    shard) of position p, counted from the first sample of batch `start`; the last batch may be
    short (evaluation).
    """

    epoch: int
    start: int
    shards: np.ndarray
    samples: np.ndarray
    batch_size: int
    crops: CropPlan | None   # None: evaluation (resize and centre crop, no flips)

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.shards) / self.batch_size)

    def span(self, batch: int) -> tuple[int, int]:
        """[lo, hi) positions of batch `batch` (an index counted like `start`)."""
        lo = (batch - self.start) * self.batch_size
        return lo, min(lo + self.batch_size, len(self.shards))

    def windows(self, batch: int, widths: np.ndarray,
                heights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The crop windows and flips of batch `batch` for images of these sizes (training only)."""
        assert self.crops is not None, "evaluation plans have no crops"
        return self.crops.windows(self.epoch, batch, widths, heights)


@dataclass(frozen=True)
class ImageSpec:
    """The images a backend makes, and what it makes them with."""

    train: bool                      # crop windows + flips (True), or resize + centre crop (False)
    size: int                        # output side in pixels
    mean: tuple[float, ...]          # normalisation, on the 0..1 scale
    std: tuple[float, ...]
    threads: int                     # DALI threads / DataLoader worker processes
    device: torch.device             # where DALI decodes ("cuda": nvJPEG) and where its output goes


@dataclass
class DecodedBatch:
    """One batch as a backend hands it to the loader (masks and device placement come after)."""

    index: int                       # the batch's index in the epoch
    images: torch.Tensor             # [B, 3, size, size] float32, normalised
    keys: list[str]
    labels: np.ndarray               # [B] int64, -1 where a sample has no class

    def pin_memory(self) -> "DecodedBatch":
        """A copy with the images in pinned memory (called by DataLoader's pin-memory thread)."""
        return replace(self, images=self.images.pin_memory())


class Backend(Protocol):
    """An epoch's batches; `close()` stops the work in flight (pipelines, threads, worker processes)."""

    def __iter__(self) -> Iterator[DecodedBatch]: ...

    def close(self) -> None: ...


class GeneratorBackend:
    """A Backend whose batches come from one generator, `_batches()`; closing it closes the
    generator (its `finally` blocks stop the work) and then calls `_release()`."""

    _gen: Iterator[DecodedBatch] | None = None

    def _batches(self) -> Iterator[DecodedBatch]:
        raise NotImplementedError

    def _release(self) -> None:
        """Free what outlives the generator (a pipeline, a thread, temporary files); idempotent."""

    def __iter__(self) -> Iterator[DecodedBatch]:
        self._gen = self._batches()
        return self._gen

    def close(self) -> None:
        """Stop now (idempotent)."""
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()
        self._release()
