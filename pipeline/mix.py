"""Weighted mixing of several data sets (`data.sources`): which samples of each an epoch takes, in what order.

A mixture's epoch is `data.samples_per_epoch` samples (default: the sources' sizes added up), in
whole batches: each of the W ranks takes `n = (samples_per_epoch // W) // batch_size * batch_size`.
Source i's share of a rank's n is its quota `n_i`, the largest-remainder rounding of
`n * w_i / sum(w)`, the same on every rank, so the realised proportions of every epoch are the
weights' up to that rounding (at most one sample per source per rank).

Where a source's samples come from: source i's samples on rank r form an endless stream whose
pass p is `order.train_plan` of that source alone on W ranks with a seed derived from (seed, i),
pass p standing in for the epoch (whole shards per rank when the source has at least W shards,
contiguous ranges of shared shards otherwise). Epoch e takes positions [e n_i, (e + 1) n_i) of
that stream: a down-weighted source goes through all of its samples before it repeats any, an
up-weighted one repeats them in a fresh order each pass.

In what order: the n positions of a rank's epoch are dealt to the sources evenly spread (the
j-th sample of source i sits at (j + phase_i) / n_i, the phases drawn from (seed, epoch, rank)),
so every batch holds close to the weights' proportions, while each source is still read in its
own order, one shard at a time.

Everything is a pure function of (seed, epoch, rank, world size), like `lmim.pipeline.order`, so
a resumed run, and an elastic one through `order.remainder_plan`, takes exactly the samples of
the uninterrupted run.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np

from lmim.pipeline.config import DataConfigError, Source
from lmim.pipeline.order import check_ranks, derive_seed, samples_per_rank, train_plan

# Streams of randomness of their own (order.py uses 1-4).
_SOURCE_STREAM, _PHASE = 5, 6


def quotas(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainder (ties go to the earlier source)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.max()   # weights have any positive scale: 1e308 twice must not sum to inf
    exact = total * (w / w.sum())
    base = np.floor(exact).astype(np.int64)
    short = total - int(base.sum())
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[:short]:
        base[i] += 1
    return [int(q) for q in base]


@dataclass(frozen=True)
class Mixture:
    """The sources of a mixture (shard counts per source, in the loader's global shard numbering:
    source i's shards are `offsets[i]`, `offsets[i] + 1`, ...) and how much of each an epoch takes."""

    counts: tuple[tuple[int, ...], ...]   # samples per shard, per source
    weights: tuple[float, ...]
    samples_per_epoch: int
    batch_size: int

    @cached_property  # read for every batch (the per-source counts)
    def offsets(self) -> np.ndarray:
        return np.cumsum([0] + [len(c) for c in self.counts])

    def rank_length(self, world_size: int) -> int:
        """Samples per rank per epoch: whole batches, the same on every rank."""
        return (samples_per_rank(self.samples_per_epoch, world_size) // self.batch_size) * self.batch_size

    def rank_quotas(self, world_size: int) -> list[int]:
        """Samples of each source per rank per epoch."""
        return quotas(self.rank_length(world_size), self.weights)

    def source_of(self, shards: np.ndarray) -> np.ndarray:
        """The source index of each (global) shard id."""
        return np.searchsorted(self.offsets, shards, side="right") - 1


def mixed_plan(
    mix: Mixture,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    excluded: Iterable[tuple[int, int]] = (),
    excluded_shards: Iterable[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """(global shard ids, sample ids within the shard) of rank `rank`'s epoch, `mix.rank_length(world_size)` long.

    `excluded` samples and `excluded_shards` (global ids; found unreadable, data.on_error=skip)
    are left out of every pass, as in `order.train_plan`.
    """
    check_ranks(world_size, rank)
    offsets = mix.offsets
    excluded, skip = list(excluded), {int(s) for s in excluded_shards}
    streams = []
    for i, (counts, quota) in enumerate(zip(mix.counts, mix.rank_quotas(world_size))):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        own = [(s - lo, x) for s, x in excluded if lo <= s < hi]
        own_shards = [s - lo for s in skip if lo <= s < hi]
        shards, samples = _source_positions(counts, world_size, rank, derive_seed(seed, _SOURCE_STREAM, i),
                                            epoch * quota, quota, own, own_shards)
        streams.append((shards + lo, samples))
    return _interleave(streams, np.random.default_rng(derive_seed(seed, _PHASE, epoch, rank)))


def _source_positions(counts: Sequence[int], world_size: int, rank: int, seed: int, start: int, length: int,
                      excluded: list[tuple[int, int]], excluded_shards: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Positions [start, start + length) of one source's endless stream on this rank."""
    if length == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    per_pass = samples_per_rank(int(sum(counts)), world_size)
    first, last = start // per_pass, (start + length - 1) // per_pass
    parts = [train_plan(counts, world_size, rank, seed, p, excluded, excluded_shards) for p in range(first, last + 1)]
    shards = np.concatenate([sh for sh, _ in parts])
    samples = np.concatenate([sa for _, sa in parts])
    lo = start - first * per_pass
    return shards[lo:lo + length], samples[lo:lo + length]


def _interleave(streams: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Merge the sources' streams, each kept in its order, evenly spread with random phases."""
    keys = []
    for shards, _ in streams:
        n = len(shards)
        keys.append((np.arange(n) + rng.random()) / max(n, 1))
    order = np.argsort(np.concatenate(keys), kind="stable")
    shards = np.concatenate([sh for sh, _ in streams])[order]
    samples = np.concatenate([sa for _, sa in streams])[order]
    return shards, samples


def check_mixture(names: Sequence[str], mix: Mixture, world_size: int) -> None:
    """Refuse, in one sentence, a mixture in which a source would never be read (or cannot be split)."""
    for name, counts in zip(names, mix.counts):
        if sum(counts) < world_size:
            raise DataConfigError(f"data source {name} holds {sum(counts)} sample(s), fewer than the {world_size} "
                                  "rank(s) that share it: use a larger data set or fewer processes.")
    if mix.rank_length(world_size) == 0:   # an epoch smaller than one batch per rank: not any one source's fault
        raise DataConfigError(
            f"an epoch of {mix.samples_per_epoch} sample(s) is less than one batch of {mix.batch_size} on each of "
            f"{world_size} rank(s): raise data.samples_per_epoch (or leave it unset) or lower data.batch_size.")
    for name, quota, weight in zip(names, mix.rank_quotas(world_size), mix.weights):
        if quota == 0:
            raise DataConfigError(
                f"data source {name} (weight {weight:g}) gets 0 of the {mix.rank_length(world_size)} samples per rank "
                f"of an epoch on {world_size} rank(s): raise its weight or data.samples_per_epoch.")


def describe_mixture(sources: Sequence[Source], mix: Mixture, world_size: int) -> str:
    """One line for the log: the epoch's size and each source's samples and share of it."""
    quotas_ = mix.rank_quotas(world_size)
    per_epoch = mix.rank_length(world_size) * world_size
    parts = [f"{s.name} (weight {s.weight:g}): {q * world_size:,} ({q / max(1, sum(quotas_)):.1%})"
             for s, q in zip(sources, quotas_)]
    return f"data: mixing {len(sources)} source(s), {per_epoch:,} samples an epoch: " + "; ".join(parts)


def default_samples_per_epoch(counts: Sequence[Sequence[int]]) -> int:
    """One epoch = as many samples as the sources hold together."""
    return int(sum(sum(c) for c in counts))


__all__ = ["Mixture", "check_mixture", "default_samples_per_epoch", "describe_mixture", "mixed_plan", "quotas"]
