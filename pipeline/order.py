"""The deterministic sample order: which samples a rank reads in an epoch, in what order, with what crops.

Everything random about the data stream is a pure function of (seed, epoch, rank, batch index),
computed here in Python with NumPy, so a resumed run reproduces the uninterrupted one exactly
and the DALI, streaming and PyTorch loaders see the very same samples and crop windows.

Training order of one epoch on one rank, in one of two modes (`shard_mode`):
- "whole shards" (at least as many shards as ranks: the scalable path):
  1. the shard order is shuffled with a seed of (seed, epoch); rank r takes shards r, r + W, ...
     (shards, not samples, are split so every rank reads whole shards, sequentially, and each
     shard is read by one rank an epoch);
  2. inside each shard the samples are permuted with a seed of (seed, epoch, shard);
  3. the concatenated stream is cut or wrapped (repeated from its start) to exactly
     `total // W` samples, so every rank yields the same number of batches even when the shard
     sizes are uneven (the cut drops a few samples that epoch; the next epoch's reshuffle changes
     which).
- "shared shards" (fewer shards than ranks, e.g. a small data set in one shard on 2 GPUs): steps
  1-2 make ONE stream for all ranks (every shard, shuffled, each permuted) and rank r takes its
  contiguous `total // W` samples, r-th of W. The ranks' samples are disjoint; a shard is read
  by the ranks whose ranges cross it (at most about W / shards + 1 of them; locally DALI's
  per-epoch index reads only the rank's own samples, while a streamed shard is fetched whole).
Samples found undecodable, and unreadable shards (policy "skip"), are left out before the cut.
Evaluation: all samples in manifest order, split into W contiguous near-equal ranges (no
duplicates, nothing dropped; per-rank counts differ by at most one sample).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from lmim.pipeline.errors import NoReadableSamples

# Distinct streams of randomness derived from the same user seed.
_SHARD_ORDER, _SAMPLE_ORDER, _CROP, _MASK = 1, 2, 3, 4


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (NumPy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & (2**63 - 1))


def check_ranks(world_size: int, rank: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}.")


def shard_mode(num_shards: int, world_size: int) -> str:
    """"whole shards" (each rank its own shards) when there are enough shards, else "shared shards"."""
    return "whole shards" if num_shards >= world_size else "shared shards"


def rank_shards(num_shards: int, world_size: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """The shards rank `rank` reads in `epoch` in "whole shards" mode, in reading order (all ranks'
    order, the epoch's shard permutation, when `world_size` is 1)."""
    check_ranks(world_size, rank)
    perm = np.random.default_rng(derive_seed(seed, _SHARD_ORDER, epoch)).permutation(num_shards)
    return perm[rank::world_size]


def samples_per_rank(total: int, world_size: int) -> int:
    return total // world_size


def train_plan(
    counts: Sequence[int],
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    excluded: Iterable[tuple[int, int]] = (),
    excluded_shards: Iterable[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """(shard ids, sample ids within the shard) of length `sum(counts) // world_size`.

    `excluded` (shard, sample) pairs and whole `excluded_shards` (found unreadable, skipped by
    data.on_error=skip) are left out; the rank's remaining stream wraps to keep its length, so
    every rank still gets the same number of batches.
    """
    skip_shards = {int(s) for s in excluded_shards}
    n = samples_per_rank(int(sum(counts)), world_size)
    bad: dict[int, set[int]] = {}
    for s, i in excluded:
        bad.setdefault(int(s), set()).add(int(i))
    whole = shard_mode(len(counts), world_size) == "whole shards"
    # whole shards: this rank's shards; shared shards: every shard, the same stream on every rank
    shard_ids = rank_shards(len(counts), world_size if whole else 1, rank if whole else 0, seed, epoch)
    shard_parts, sample_parts = [], []
    for s in shard_ids:
        s = int(s)
        if s in skip_shards:
            continue
        perm = np.random.default_rng(derive_seed(seed, _SAMPLE_ORDER, epoch, s)).permutation(int(counts[s]))
        if s in bad:
            perm = perm[~np.isin(perm, list(bad[s]))]
        shard_parts.append(np.full(len(perm), s, dtype=np.int64))
        sample_parts.append(perm.astype(np.int64))
    shards = np.concatenate(shard_parts) if shard_parts else np.zeros(0, np.int64)
    samples = np.concatenate(sample_parts) if sample_parts else np.zeros(0, np.int64)
    if not whole:  # this rank's contiguous range of the one stream
        size = len(shards) // world_size
        shards, samples = shards[rank * size:(rank + 1) * size], samples[rank * size:(rank + 1) * size]
    if len(shards) == 0:
        raise NoReadableSamples(f"rank {rank} has no readable samples in epoch {epoch} (all its shards are empty or "
                                "skipped as unreadable); find the broken shards with `lmim verify DST` and rebuild them with `lmim shard SRC DST --recheck`, or use fewer ranks.")
    if len(shards) < n:  # wrap: repeat this rank's own stream from its start
        reps = math.ceil(n / len(shards))
        shards, samples = np.tile(shards, reps), np.tile(samples, reps)
    return shards[:n], samples[:n]


def remainder_plan(
    old_plans: Sequence[tuple[np.ndarray, np.ndarray]],
    old_rank_length: int,
    consumed: int,
    new_world: int,
    rank: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank `rank` of `new_world`'s share of what an interrupted epoch had left (elastic resume).

    The epoch ran on `len(old_plans)` ranks with these plans (`train_plan` or
    `mix.mixed_plan` of each old rank), each cut to `old_rank_length` samples (whole batches), and
    every rank consumed its first `consumed`. What no rank consumed is joined in old rank order and
    cut into `new_world` contiguous ranges of equal length: across the two runs every sample of the
    epoch is taken once; the `< new_world` left over by the division are not.
    """
    check_ranks(new_world, rank)
    shards = np.concatenate([sh[consumed:old_rank_length] for sh, _ in old_plans])
    samples = np.concatenate([sa[consumed:old_rank_length] for _, sa in old_plans])
    size = len(shards) // new_world
    return shards[rank * size:(rank + 1) * size], samples[rank * size:(rank + 1) * size]


def eval_plan(counts: Sequence[int], world_size: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank `rank`'s contiguous slice of all samples in manifest order (one pass, no duplicates)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}.")
    shards = np.concatenate([np.full(int(c), s, dtype=np.int64) for s, c in enumerate(counts)] or [np.zeros(0, np.int64)])
    samples = np.concatenate([np.arange(int(c), dtype=np.int64) for c in counts] or [np.zeros(0, np.int64)])
    bounds = np.linspace(0, len(shards), world_size + 1).round().astype(int)
    lo, hi = bounds[rank], bounds[rank + 1]
    return shards[lo:hi], samples[lo:hi]


def runs(shards: np.ndarray) -> list[tuple[int, int, int]]:
    """Split a plan into maximal runs of one shard: (shard, start, stop) positions."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for pos in range(1, len(shards) + 1):
        if pos == len(shards) or shards[pos] != shards[start]:
            out.append((int(shards[start]), start, pos))
            start = pos
    return out


def crop_windows(
    widths: np.ndarray,
    heights: np.ndarray,
    seed: int,
    epoch: int,
    rank: int,
    batch: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RandomResizedCrop windows and flips for one batch, with torchvision's exact semantics.

    Up to 10 attempts per image draw an area fraction uniform in `scale` and an aspect ratio
    log-uniform in `ratio`; the first that fits the image wins, at a uniform integer position;
    otherwise the whole image cropped to the nearest allowed ratio, centred. Vectorised over
    the batch; the random numbers depend only on (seed, epoch, rank, batch).

    Returns:
        anchors [B, 2] float32 (x, y), shapes [B, 2] float32 (w, h), flips [B] int32 (1 = mirror).
    """
    rng = np.random.default_rng(derive_seed(seed, _CROP, epoch, rank, batch))
    b = len(widths)
    u = rng.random((b, 23))
    W = widths.astype(np.float64)[:, None]
    H = heights.astype(np.float64)[:, None]
    area = W * H * (scale[0] + (scale[1] - scale[0]) * u[:, 0:10])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[:, 10:20])
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(b), first]
    cw = w[np.arange(b), first]
    ch = h[np.arange(b), first]
    W, H = W[:, 0], H[:, 0]
    x = np.floor(u[:, 20] * (W - cw + 1))
    y = np.floor(u[:, 21] * (H - ch + 1))
    # Fallback (torchvision): whole image, clamped to the ratio range, centred.
    in_ratio = W / H
    fw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.round(H * ratio[1]), W))
    fh = np.where(in_ratio < ratio[0], np.round(W / ratio[0]), H)
    fw, fh = np.minimum(fw, W), np.minimum(fh, H)
    cw, ch = np.where(found, cw, fw), np.where(found, ch, fh)
    x = np.where(found, x, np.floor((W - cw) / 2))
    y = np.where(found, y, np.floor((H - ch) / 2))
    anchors = np.stack([x, y], 1).astype(np.float32)
    shapes = np.stack([cw, ch], 1).astype(np.float32)
    flips = (u[:, 22] < hflip).astype(np.int32)
    return anchors, shapes, flips


def mask_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    return derive_seed(seed, _MASK, epoch, rank, batch)
