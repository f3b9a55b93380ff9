"""`build_loader`: one iterator per process from a dataset (local or remote) to `Batch`es on the device.

The loader is three layers:
1. `lmim.pipeline.order`: a deterministic plan (which samples, in which order, with which crop
   windows and flips) as a pure function of (seed, epoch, rank, batch);
2. a backend that turns the plan into image tensors: DALI (`loader="dali"`, the default: the
   webdataset reader for local shards, whole-shard streaming for remote ones) or the plain
   PyTorch baseline (`loader="torch"`: PIL + torchvision in DataLoader workers). A backend sees
   only the plan, the shards (`lmim.pipeline.source.ShardSource`) and the image spec, and fails
   with typed errors that say where (`lmim.pipeline.backend`); the loader applies data.on_error;
3. masks made on the device with `lmim.model.masks.make_masks` from a `torch.Generator` on that
   device seeded by (seed, epoch, rank, batch): masks are a few hundred int64 per image, so
   this costs nothing next to decoding, is exactly resumable, and is the torch reference by
   construction (no second implementation to keep in sync).

Resume: `state_dict()` is (epoch, next batch, the samples skipped as undecodable, and what the
plan depends on). Restoring it rebuilds the plan and starts the backend at that batch, so the
resumed run yields exactly the samples, crops, flips and masks of the uninterrupted one and
re-reads only the shard(s) the interrupted batch was in. If the world size, rank, batch size or
dataset changed, mid-epoch positions mean nothing any more: the loader warns and resumes at the
start of the next epoch (or of the same epoch when the checkpoint was taken on a boundary).
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
from typing import Any, Iterator

import numpy as np
import torch

from lmim.pipeline.backend import Backend, CropPlan, DecodedBatch, EpochPlan, ImageSpec
from lmim.pipeline.batch import Batch
from lmim.pipeline.config import DataConfig, Source, check_data_config, check_reader, training_sources
from lmim.pipeline.errors import (BatchFailed, DataError, DatasetTooSmall, SampleError, ShardError,
                                  StoreUnreachable)
from lmim.pipeline.format.manifest import Manifest, read_manifest
from lmim.pipeline.mix import Mixture, check_mixture, default_samples_per_epoch, mixed_plan
from lmim.pipeline.order import check_ranks, eval_plan, mask_seed, remainder_plan, shard_mode, train_plan
from lmim.pipeline.source import MixedSource, ShardSource
from lmim.pipeline.storage import RetryPolicy, is_remote

log = logging.getLogger(__name__)

STATE_VERSION = 1


def decodable(data: bytes) -> str | None:
    """None when PIL decodes the image fully, else the reason (used only to pinpoint a failed batch)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
        return None
    except Exception as e:  # PIL raises many types for corrupt data
        return f"{type(e).__name__}: {e}"


class Loader:
    """Batches of one rank, one epoch per `iter()`. See `build_loader`."""

    def __init__(self, cfg: DataConfig, *, grid_size: int, patch_size: int, patch_gap: int, train: bool = True,
                 rank: int = 0, world_size: int = 1, device: torch.device | str | None = None, seed: int = 0,
                 url: str | None = None):
        check_data_config(cfg)  # the config loader ran it already; callers from Python may not have
        self.cfg = cfg
        self.train = train
        self.grid_size, self.patch_size, self.patch_gap = grid_size, patch_size, patch_gap
        self.out_size = grid_size * (patch_size + (patch_gap if train else 0))
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device if device is not None else "cpu")
        check_ranks(world_size, rank)
        # Training reads data.sources (or data.url); an evaluation loader, or an explicit `url`, one dataset.
        self.sources: list[Source] = (training_sources(cfg) if train and url is None
                                      else [Source(url or cfg.url, 1.0, url or cfg.url)])
        self.url = ", ".join(s.url for s in self.sources)
        self.retry = RetryPolicy(budget_s=cfg.retry_budget_s, max_retries=cfg.max_retries)
        sources = [self._open_source(s.url) for s in self.sources]
        self.manifest: Manifest = sources[0].manifest
        self.counts = [info.samples for src in sources for info in src.manifest.shards]
        # What the data *is*, beyond its counts: a rebuilt or other data set of the same size must not
        # take a mid-epoch position saved on this one (it would train some samples twice, others never).
        self._content_id = hashlib.sha256("\n".join(
            f"{info.samples} {info.checksum}" for src in sources for info in src.manifest.shards).encode()).hexdigest()
        self.has_labels = len(sources) == 1 and self.manifest.classes is not None
        self.batch_size = cfg.batch_size
        # A mixture (several sources, or an epoch of a set size): pipeline/mix.py plans the epochs.
        self.mix: Mixture | None = None
        if train and (len(sources) > 1 or cfg.samples_per_epoch is not None):
            per_source = tuple(tuple(info.samples for info in src.manifest.shards) for src in sources)
            self.mix = Mixture(per_source, tuple(s.weight for s in self.sources),
                               int(cfg.samples_per_epoch or default_samples_per_epoch(per_source)), cfg.batch_size)
            check_mixture([s.url for s in self.sources], self.mix, world_size)
        # how the ranks share the shards (pipeline/order.py): "whole shards", "shared shards", a
        # mixture (each source split its own way, pipeline/mix.py), or one ordered pass
        self.shard_mode = ("evaluation pass" if not train else "mixed sources" if self.mix is not None
                           else shard_mode(len(self.counts), world_size))
        if train:
            self._num_batches = self._rank_length(world_size) // cfg.batch_size
            if self._num_batches == 0 and sum(self.counts) == 0:
                raise DatasetTooSmall(f"the dataset at {self.url} holds no samples (every file of its source was "
                                      "rejected, see its rejects.jsonl); build it from a folder of images.")
            if self._num_batches == 0:
                size = f"{self.mix.samples_per_epoch} samples per epoch" if self.mix else f"{sum(self.counts)} samples"
                raise DatasetTooSmall(f"batch size {cfg.batch_size} x {world_size} rank(s) is larger than the dataset "
                                      f"({size} at {self.url}): lower data.batch_size.")
        else:
            n = len(eval_plan(self.counts, world_size, rank)[0])
            self._num_batches = math.ceil(n / cfg.batch_size)
        self.source: ShardSource | MixedSource = sources[0] if len(sources) == 1 else MixedSource(sources)
        self._source_samples = [0] * len(sources)  # samples this process took from each source, over the run
        self.spec = ImageSpec(train=train, size=self.out_size, mean=tuple(cfg.mean), std=tuple(cfg.std),
                              threads=cfg.num_threads, device=self.device)
        self._crops = (CropPlan(seed, rank, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.hflip)
                       if train else None)
        self.epoch = 0
        self._next_batch = 0
        # set when a resume could not take the saved mid-epoch position and went on from the next epoch
        # (the trainer then moves its step counter there too, so the run still trains `epochs` epochs)
        self.resumed_at_next_epoch = False
        self._bad: set[tuple[int, int]] = set()
        self._skipped_keys: list[str] = []
        self._bad_shards: list[int] = []  # shards found unreadable and skipped (data.on_error=skip)
        # Elastic resume: the epoch that another number of ranks interrupted, and what it had left
        # (`order.remainder_plan`'s arguments); None when every epoch is a whole one.
        self._carry: dict[str, int] | None = None
        self._active: Backend | None = None  # the backend of the epoch in progress
        self._token: object | None = None  # identifies the live iterator

    def _open_source(self, url: str) -> ShardSource:
        cfg = self.cfg
        check_reader(cfg.reader, url)
        streaming = cfg.reader == "stream" or (cfg.reader == "auto" and is_remote(url))
        manifest = read_manifest(url, cfg.storage_options, retry=self.retry)
        return ShardSource(manifest, url, streaming=streaming, verify_local=cfg.verify_local,
                           storage_options=cfg.storage_options, retry=self.retry, cache_dir=cfg.cache_dir,
                           cache_max_bytes=cfg.cache_max_bytes, prefetch_depth=cfg.prefetch_shards)

    def _rank_length(self, world_size: int) -> int:
        """Training samples per rank per epoch on `world_size` ranks (whole batches)."""
        if self.mix is not None:
            return self.mix.rank_length(world_size)
        return ((sum(self.counts) // world_size) // self.batch_size) * self.batch_size

    def _data_fingerprint(self) -> list | None:
        """What a mid-epoch position depends on besides the shard counts: the mixture, if any."""
        if self.mix is None:
            return None
        return [[s.url, s.weight] for s in self.sources] + [self.mix.samples_per_epoch]

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        return self._num_batches

    @property
    def epochs_done(self) -> float:
        """Epochs of data this process has consumed, fractions included: what a log's `epoch` is, also
        after a resume that moved the data to the next epoch boundary (another batch size or seed)."""
        left = self._batches_in(self.epoch) - self._next_batch
        return self.epoch + 1 - left / max(self._num_batches, 1)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: samples skipped as undecodable (and their keys), streaming I/O, and the samples
        this process took from each source (summed over processes, the run's; see load_elastic_state)."""
        s = self.source.stats
        return {"skipped": len(self._skipped_keys), "skipped_keys": list(self._skipped_keys),
                "skipped_shards": [self.source.name(sid) for sid in self._bad_shards],
                "shards_fetched": s.shards_fetched, "bytes_fetched": s.bytes_fetched, "retries": s.retries,
                "cache_hits": s.cache_hits,
                "source_samples": {src.name: n for src, n in zip(self.sources, self._source_samples)}}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self._next_batch, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "train": self.train, "num_samples": sum(self.counts), "num_shards": len(self.counts),
                "bad": sorted([int(s), int(i)] for s, i in self._bad), "skipped_keys": list(self._skipped_keys),
                "bad_shards": list(self._bad_shards), "carry": self._carry, "mix": self._data_fingerprint(),
                "data_id": self._content_id,
                "source_samples": list(self._source_samples)}

    def batches_left(self) -> int:
        """Batches this rank still yields in the current epoch."""
        return self._batches_in(self.epoch) - self._next_batch

    def load_elastic_state(self, states: list[dict[str, Any]]) -> bool:
        """Resume from the states of every rank of a run with another number of ranks.

        Mid-epoch, the samples no old rank consumed are re-split over this run's ranks
        (`order.remainder_plan`); later epochs follow this run's world size. Returns False (and
        changes nothing) when that cannot be exact: another data set, seed, batch size or an
        evaluation loader, ranks at different positions, or an epoch that was itself resumed
        elastically; the caller then falls back to the next epoch boundary.
        """
        self.resumed_at_next_epoch = False   # a state tried before (a damaged newest checkpoint) says nothing here
        first = states[0]
        same = all(int(st.get("version", 0)) == STATE_VERSION and st["epoch"] == first["epoch"]
                   and st["batch"] == first["batch"] and not st.get("carry") for st in states)
        same = same and first["train"] and self.train and first["seed"] == self.seed
        same = same and first["batch_size"] == self.batch_size and first["world_size"] == len(states)
        if not (same and self._same_data(first)):
            return False
        # The run's per-source counts are the sum over processes: the old processes' go to rank 0.
        old_counts = [st.get("source_samples") or [0] * len(self.sources) for st in states]
        self._source_samples = [sum(c) if self.rank == 0 else 0 for c in zip(*old_counts)]
        self._restore_skips(states)
        old_world, epoch, done = len(states), int(first["epoch"]), int(first["batch"])
        self.epoch, self._next_batch, self._carry = epoch, 0, None
        if done > 0:
            self._carry = {"epoch": epoch, "old_world": old_world, "old_rank_length": self._rank_length(old_world),
                           "consumed": done * self.batch_size}
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}: "
                             "the checkpoint comes from another lmim version.")
        self.epoch, self._next_batch = int(state["epoch"]), int(state["batch"])
        self.resumed_at_next_epoch = False   # a state tried before (a damaged newest checkpoint) says nothing here
        same_data = self._same_data(state)
        if state.get("source_samples") and self._same_sources(state):  # "over the run", also with new weights
            self._source_samples = [int(n) for n in state["source_samples"]]
        self._restore_skips([state] if same_data else [])
        self._carry = state.get("carry") if same_data else None
        changed = self._what_changed(state, same_data)
        if changed and self._next_batch > 0:
            log.warning("the data loader resumes at the start of epoch %d, not mid-epoch, because %s changed since "
                        "the checkpoint", self.epoch + 1, ", ".join(changed))
            self.epoch, self._next_batch = self.epoch + 1, 0
            self.resumed_at_next_epoch = True
        if self.epoch < 0 or not 0 <= self._next_batch <= self._batches_in(self.epoch):
            raise ValueError(f"loader state says epoch {self.epoch}, batch {self._next_batch}, but that epoch has "
                             f"{self._batches_in(self.epoch)} batches here")

    def _what_changed(self, state: dict[str, Any], same_data: bool) -> list[str]:
        """What differs between `state` and this loader, in words (["batch_size 64 -> 32", ...]); empty
        when the saved mid-epoch position carries over."""
        # (the rank is not a reason of its own: it changes with the world size, or not at all)
        now = {"world_size": self.world_size, "batch_size": self.batch_size, "seed": self.seed, "train": self.train}
        changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if state[k] != v]
        if (state["num_samples"], state["num_shards"]) != (sum(self.counts), len(self.counts)):
            changed.append(f"the data ({state['num_samples']} samples in {state['num_shards']} shards -> "
                           f"{sum(self.counts)} in {len(self.counts)})")
        elif state.get("mix") != self._data_fingerprint():
            changed.append("the data.sources mixture (its URLs or weights)")
        elif not same_data:
            changed.append("the data's content (its shards' checksums differ: another or a rebuilt data set)")
        return changed

    def _same_sources(self, state: dict[str, Any]) -> bool:
        """`state` was saved reading the same sources, in the same order (their weights may differ)."""
        old, new = state.get("mix"), self._data_fingerprint()
        if old is None or new is None:
            return old is None and new is None
        return [src[0] for src in old[:-1]] == [src[0] for src in new[:-1]]

    def _same_data(self, state: dict[str, Any]) -> bool:
        """`state` was saved reading the data this loader reads (shard counts and checksums, and the
        mixture if any). A state saved before lmim recorded the checksums is judged by the rest."""
        return ((state["num_samples"], state["num_shards"]) == (sum(self.counts), len(self.counts))
                and state.get("mix") == self._data_fingerprint()
                and state.get("data_id", self._content_id) == self._content_id)

    def _restore_skips(self, states: list[dict[str, Any]]) -> None:
        """The samples and shards that any of `states`' processes found unreadable (data.on_error=skip)."""
        bad = {(int(s), int(i)) for st in states for s, i in st.get("bad", [])}
        bad_shards = list(dict.fromkeys(int(s) for st in states for s in st.get("bad_shards", [])))
        # A checkpoint is data from outside: a shard or sample it names must be one of this data set's
        # (or the loader would fail with an IndexError steps later, far from the cause).
        for s, i in bad:
            if not (0 <= s < len(self.counts) and 0 <= i < self.counts[s]):
                raise ValueError(f"the loader state names sample {i} of shard {s}, which this data set does not hold")
        for s in bad_shards:
            if not 0 <= s < len(self.counts):
                raise ValueError(f"the loader state names shard {s}; this data set has {len(self.counts)}")
        self._bad, self._bad_shards = bad, bad_shards
        self._skipped_keys = [str(k) for st in states for k in st.get("skipped_keys", [])]

    def close(self) -> None:
        """Stop the epoch in progress (its DALI pipeline, prefetch thread, workers) and drop caches."""
        backend, self._active = self._active, None
        if backend is not None:
            backend.close()
        self.source.forget()

    def __iter__(self) -> Iterator[Batch]:
        # Only the newest iterator is live: starting another one stops the older one's pipeline,
        # and the older one then ends without touching the position.
        token = object()
        self._token = token
        if self._active is not None:
            self._active.close()
            self._active = None
        while True:
            epoch, start = self.epoch, self._next_batch
            if start >= self._batches_in(epoch):
                break
            plan = self._epoch_plan(epoch, start)
            backend = self._backend(plan)
            self._active = backend
            try:
                for decoded in self._guarded(backend, plan):
                    if self._token is not token:
                        return
                    self._next_batch = decoded.index + 1
                    self._count_sources(plan, decoded.index)
                    yield self._batch(epoch, decoded)
            except _Skipped:
                continue  # a bad sample or shard was excluded: re-plan and continue from the failed batch
            finally:
                backend.close()
                if self._active is backend:
                    self._active = None
            break
        if self._token is token and self._next_batch >= self._batches_in(self.epoch):
            self.epoch, self._next_batch = self.epoch + 1, 0

    # ------------------------------------------------------------------ plan
    def _batches_in(self, epoch: int) -> int:
        """Batches of `epoch` on this rank (fewer in an epoch resumed on another number of ranks)."""
        carry = self._carry
        if carry is not None and carry["epoch"] == epoch:
            left = carry["old_world"] * (carry["old_rank_length"] - carry["consumed"])
            return (left // self.world_size) // self.batch_size
        return self._num_batches

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.train:
            return eval_plan(self.counts, self.world_size, self.rank)
        carry = self._carry
        if carry is not None and carry["epoch"] == epoch:
            old = [self._rank_plan(carry["old_world"], r, epoch) for r in range(carry["old_world"])]
            shards, samples = remainder_plan(old, carry["old_rank_length"], carry["consumed"], self.world_size,
                                             self.rank)
        else:
            shards, samples = self._rank_plan(self.world_size, self.rank, epoch)
        n = self._batches_in(epoch) * self.batch_size  # drop_last
        return shards[:n], samples[:n]

    def _rank_plan(self, world_size: int, rank: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Rank `rank` of `world_size`'s whole training plan of `epoch`."""
        if self.mix is not None:
            return mixed_plan(self.mix, world_size, rank, self.seed, epoch, self._bad, self._bad_shards)
        return train_plan(self.counts, world_size, rank, self.seed, epoch, self._bad, self._bad_shards)

    def _epoch_plan(self, epoch: int, start: int) -> EpochPlan:
        """What is left of `epoch` from batch `start` on."""
        shards, samples = self._plan(epoch)
        lo = start * self.batch_size
        return EpochPlan(epoch, start, shards[lo:], samples[lo:], self.batch_size, self._crops)

    # ------------------------------------------------------------------ backends
    def _backend(self, plan: EpochPlan) -> Backend:
        if self.cfg.loader == "torch":
            from lmim.pipeline.torch_loader import TorchBatches

            return TorchBatches(plan, self.source, self.spec)
        from lmim.pipeline.dali import DaliBatches

        return DaliBatches(plan, self.source, self.spec)

    def _guarded(self, backend: Backend, plan: EpochPlan) -> Iterator[DecodedBatch]:
        """The backend's batches; a failure becomes a named error, or a skip (data.on_error)."""
        try:
            yield from backend
        except SampleError as e:
            if self.cfg.on_error == "skip" and e.position is not None:
                self._skip(e)
            raise
        except StoreUnreachable:
            raise  # an outage is not a bad shard: stop, and resume when the store is back
        except ShardError as e:
            # One policy, local and remote: data.on_error=skip leaves the whole shard out (named
            # in the log, counted, saved in the loader state) and re-plans from the failed batch.
            if self.cfg.on_error == "skip" and self.train:
                self._skip_shard(e)
            raise
        except BatchFailed as e:
            self._pinpoint(e, plan)

    def _pinpoint(self, failure: BatchFailed, plan: EpochPlan) -> None:
        """Find the undecodable sample of a failed batch (the batch, and DALI's prefetch after it) and
        raise (or skip) it by name; when every sample decodes, say which batch and shards failed."""
        lo = plan.span(failure.batch)[0]
        positions = [(int(plan.shards[p]), int(plan.samples[p]))
                     for p in range(lo, min(lo + 3 * self.batch_size, len(plan.shards)))]
        for (sid, idx), (data, key) in zip(positions, self.source.samples(positions)):
            reason = decodable(data)
            if reason is not None:
                err = SampleError(self.source.name(sid), key, f"undecodable ({reason})", position=(sid, idx))
                if self.cfg.on_error == "raise":
                    raise err from failure.cause
                self._skip(err)
        names = sorted({self.source.name(int(s)) for s in plan.shards[lo:lo + self.batch_size]})
        raise DataError(f"the pipeline failed on batch {failure.batch} of epoch {self.epoch} (shards "
                        f"{', '.join(names)}): {failure.cause}") from failure.cause

    def _skip_shard(self, err: ShardError) -> None:
        sid = self.source.id_of(err.shard)
        if sid is None or sid in self._bad_shards:
            return
        self._bad_shards.append(sid)
        self.source.forget(sid)
        log.warning("skipping %s (data.on_error=skip; %d shard(s) skipped so far)", err, len(self._bad_shards))
        raise _Skipped()

    def _skip(self, err: SampleError) -> None:
        self._bad.add(err.position)
        self._skipped_keys.append(err.key)
        log.warning("skipping %s (data.on_error=skip; %d skipped so far)", err, len(self._skipped_keys))
        raise _Skipped()

    # ------------------------------------------------------------------ batch assembly
    def _count_sources(self, plan: EpochPlan, batch: int) -> None:
        """Add batch `batch`'s samples to the per-source counts."""
        lo, hi = plan.span(batch)
        if self.mix is None:
            self._source_samples[0] += hi - lo
            return
        for i, n in enumerate(np.bincount(self.mix.source_of(plan.shards[lo:hi]), minlength=len(self.sources))):
            self._source_samples[i] += int(n)

    def _batch(self, epoch: int, decoded: DecodedBatch) -> Batch:
        dev, b = self.device, decoded.index
        images = decoded.images.to(dev, non_blocking=True)
        n = self.grid_size * self.grid_size
        bsz = images.shape[0]
        if self.train:
            from lmim.model.masks import make_masks

            g = torch.Generator(device=dev)
            g.manual_seed(mask_seed(self.seed, epoch, self.rank, b))
            c = self.cfg
            visible, target = make_masks(c.mask, bsz, self.grid_size, c.num_visible, generator=g, device=dev,
                                         block_min_scale=c.block_min_scale, block_max_scale=c.block_max_scale,
                                         block_aspect=tuple(c.block_aspect), num_blocks=c.num_blocks)
        else:
            visible = torch.arange(n, device=dev).expand(bsz, n).contiguous()
            target = torch.zeros(bsz, 0, dtype=torch.int64, device=dev)
        lab = torch.as_tensor(np.asarray(decoded.labels, np.int64)).to(dev) if self.has_labels else None
        return Batch(images=images, visible=visible, target=target, labels=lab, keys=list(decoded.keys))


class _Skipped(Exception):
    """Internal: a sample was added to the skip list; the epoch is re-planned."""


def build_loader(cfg: DataConfig, *, grid_size: int, patch_size: int, patch_gap: int, train: bool = True,
                 rank: int = 0, world_size: int = 1, device: torch.device | str | None = None, seed: int = 0,
                 url: str | None = None) -> Loader:
    """The data loader of one process.

    Args:
        cfg: the `data:` config (`cfg.url` unless `url` is given, e.g. `cfg.eval_url`).
        grid_size, patch_size, patch_gap: image geometry from the model config; training images
            are `grid * (patch + gap)` px, evaluation images `grid * patch` px.
        train: RandomResizedCrop + flip + masks, equal batches per rank, drop_last (True); or one
            ordered pass over all samples, each rank a contiguous disjoint part, resize +
            centre crop, all patches visible and no targets, last batch may be short (False).
        rank, world_size: this process's place in the job (shards are split across ranks).
        device: where batches are produced ("cuda:N" decodes on that GPU with DALI).
        seed: drives shard order, sample order, crops, flips and masks.
    """
    return Loader(cfg, grid_size=grid_size, patch_size=patch_size, patch_gap=patch_gap, train=train, rank=rank,
                  world_size=world_size, device=device, seed=seed, url=url)
