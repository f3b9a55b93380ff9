"""`build_loader`: one iterator per process from a dataset (local or remote) to `Batch`es on the device.

The loader is three layers:
1. `lmim.pipeline.order`: a deterministic plan (which samples, in which order, with which crop
   windows and flips) as a pure function of (seed, epoch, rank, batch);
2. a backend that turns the plan into image tensors: DALI (`loader="dali"`, the default: the
   webdataset reader for local shards, whole-shard streaming for remote ones) or the plain
   PyTorch baseline (`loader="torch"`: PIL + torchvision in DataLoader workers);
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

import io
import logging
import math
import os
import shutil
import tempfile
import warnings
from typing import Any, Iterator

import numpy as np
import torch

from lmim.pipeline.batch import Batch
from lmim.pipeline.config import DataConfig
from lmim.pipeline.errors import DataError, DatasetTooSmall, SampleError, ShardError, StoreUnreachable
from lmim.pipeline.format.checksum import algorithm_of, checksum_of_file, verify_shard_checksum
from lmim.pipeline.format.manifest import Manifest, read_manifest
from lmim.pipeline.order import check_ranks, crop_windows, eval_plan, mask_seed, runs, train_plan
from lmim.pipeline.shards import ShardMeta, read_local_meta, read_span, write_index
from lmim.pipeline.storage import RetryPolicy, is_remote, join, local_path
from lmim.pipeline.stream import Prefetcher, ShardFetcher, StreamStats

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
        if cfg.loader not in ("dali", "torch"):
            raise ValueError(f"data.loader must be 'dali' or 'torch', got {cfg.loader!r}.")
        if cfg.reader not in ("auto", "dali", "stream"):
            raise ValueError(f"data.reader must be 'auto', 'dali' or 'stream', got {cfg.reader!r}.")
        if cfg.on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {cfg.on_error!r}.")
        if cfg.batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {cfg.batch_size}.")
        self.cfg = cfg
        self.train = train
        self.grid_size, self.patch_size, self.patch_gap = grid_size, patch_size, patch_gap
        self.out_size = grid_size * (patch_size + (patch_gap if train else 0))
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device if device is not None else "cpu")
        self.url = url or cfg.url
        self.local = not is_remote(self.url)
        if cfg.reader == "dali" and not self.local:
            raise ValueError(f"data.reader='dali' reads local shards only; {self.url} is remote: use "
                             "data.reader='stream' (or 'auto').")
        self.streaming = cfg.reader == "stream" or (cfg.reader == "auto" and not self.local)
        self.retry = RetryPolicy(budget_s=cfg.retry_budget_s, max_retries=cfg.max_retries)
        self.manifest: Manifest = read_manifest(self.url, cfg.storage_options, retry=self.retry)
        self.counts = [s.samples for s in self.manifest.shards]
        self.has_labels = self.manifest.classes is not None
        self.batch_size = cfg.batch_size
        total = sum(self.counts)
        if train:
            check_ranks(len(self.counts), world_size, rank)
            self._num_batches = (total // world_size) // cfg.batch_size
            if self._num_batches == 0:
                raise DatasetTooSmall(f"batch size {cfg.batch_size} x {world_size} rank(s) is larger than the dataset "
                                 f"({total} samples at {self.url}): lower data.batch_size.")
        else:
            n = len(eval_plan(self.counts, world_size, rank)[0])
            self._num_batches = math.ceil(n / cfg.batch_size)
        self.epoch = 0
        self._next_batch = 0
        self._bad: set[tuple[int, int]] = set()
        self._meta: dict[int, ShardMeta] = {}
        self._stream_stats = StreamStats()
        self._skipped_keys: list[str] = []
        self._bad_shards: list[int] = []  # shards found unreadable and skipped (data.on_error=skip)
        self._fetcher: ShardFetcher | None = None
        self._active = None  # the backend generator of the epoch in progress
        self._token: object | None = None  # identifies the live iterator

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        return self._num_batches

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: samples skipped as undecodable (and their keys), and streaming I/O."""
        s = self._stream_stats
        return {"skipped": len(self._skipped_keys), "skipped_keys": list(self._skipped_keys),
                "skipped_shards": [self.shard_name(s) for s in self._bad_shards],
                "shards_fetched": s.shards_fetched, "bytes_fetched": s.bytes_fetched, "retries": s.retries,
                "cache_hits": s.cache_hits}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self._next_batch, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "train": self.train, "num_samples": sum(self.counts), "num_shards": len(self.counts),
                "bad": sorted([int(s), int(i)] for s, i in self._bad), "skipped_keys": list(self._skipped_keys),
                "bad_shards": list(self._bad_shards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}: "
                             "the checkpoint comes from another lmim version.")
        self.epoch, self._next_batch = int(state["epoch"]), int(state["batch"])
        same_data = (state["num_samples"], state["num_shards"]) == (sum(self.counts), len(self.counts))
        self._bad = {(int(s), int(i)) for s, i in state.get("bad", [])} if same_data else set()
        self._skipped_keys = list(state.get("skipped_keys", [])) if same_data else []
        self._bad_shards = [int(s) for s in state.get("bad_shards", [])] if same_data else []
        same = (same_data and state["world_size"] == self.world_size and state["rank"] == self.rank
                and state["batch_size"] == self.batch_size and state["seed"] == self.seed
                and state["train"] == self.train)
        if not same and self._next_batch > 0:
            warnings.warn(
                f"data loader state was saved with world_size={state['world_size']}, rank={state['rank']}, "
                f"batch_size={state['batch_size']}, seed={state['seed']}, {state['num_samples']} samples; now "
                f"world_size={self.world_size}, rank={self.rank}, batch_size={self.batch_size}, seed={self.seed}, "
                f"{sum(self.counts)} samples: the mid-epoch position does not carry over, so data resumes at the "
                f"start of epoch {self.epoch + 1}.", stacklevel=2)
            self.epoch, self._next_batch = self.epoch + 1, 0

    def close(self) -> None:
        """Stop the epoch in progress (its DALI pipeline, prefetch thread, workers) and drop caches."""
        gen, self._active = self._active, None
        if gen is not None:
            gen.close()
        self._meta.clear()

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
            if start >= self._num_batches:
                break
            gen = self._backend(epoch, start, *self._plan(epoch))
            self._active = gen
            try:
                for b, images, keys, labels in gen:
                    if self._token is not token:
                        return
                    self._next_batch = b + 1
                    yield self._batch(epoch, b, images, keys, labels)
            except _Skipped:
                continue  # a bad sample was excluded: re-plan and continue from the failed batch
            finally:
                gen.close()
                if self._active is gen:
                    self._active = None
            break
        if self._token is token and self._next_batch >= self._num_batches:
            self.epoch, self._next_batch = self.epoch + 1, 0

    # ------------------------------------------------------------------ plan
    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self.train:
            shards, samples = train_plan(self.counts, self.world_size, self.rank, self.seed, epoch, self._bad,
                                         self._bad_shards)
            n = self._num_batches * self.batch_size  # drop_last
            return shards[:n], samples[:n]
        return eval_plan(self.counts, self.world_size, self.rank)

    def _positions(self, start: int, shards: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = start * self.batch_size
        return shards[lo:], samples[lo:]

    # ------------------------------------------------------------------ shards and metadata
    def shard_name(self, sid: int) -> str:
        return self.manifest.shards[sid].name

    def _local_paths(self, sid: int) -> tuple[str, str]:
        info = self.manifest.shards[sid]
        root = local_path(self.url)
        return join(root, info.name), join(root, info.index)

    def local_meta(self, sid: int) -> ShardMeta:
        meta = self._meta.get(sid)
        if meta is None:
            tar, idx = self._local_paths(sid)
            info = self.manifest.shards[sid]
            meta = read_local_meta(tar, idx, info.name, info.samples)
            if os.path.getsize(tar) != info.bytes:
                raise ShardError(info.name, f"truncated or changed: {os.path.getsize(tar)} bytes on disk, the manifest "
                                            f"says {info.bytes} (rebuild it with `lmim shard`)")
            # One integrity policy for both paths: remote shards are checked on every fetch, local
            # ones once per process before their first use (XXH3 hashes at tens of GB/s, so this
            # costs one extra read of the shard, not a decode).
            if self.cfg.verify_local and info.checksum:
                verify_shard_checksum(info, checksum_of_file(tar, algorithm_of(info.checksum)))
            self._meta[sid] = meta
        return meta

    def fetcher(self) -> ShardFetcher:
        if self._fetcher is None:
            self._fetcher = ShardFetcher(self.url, self.cfg.storage_options, retry=self.retry,
                                         cache_dir=self.cfg.cache_dir, cache_max_bytes=self.cfg.cache_max_bytes,
                                         stats=self._stream_stats)
        return self._fetcher

    def _sample(self, sid: int, idx: int, loaded: dict[int, Any]) -> tuple[bytes, str]:
        """(encoded image, key) of one sample, read again (only to diagnose a failed batch)."""
        if self.streaming:
            if sid not in loaded:
                loaded[sid] = self.fetcher().load(self.manifest.shards[sid])
            return loaded[sid].images[idx], loaded[sid].meta.keys[idx]
        meta = self.local_meta(sid)
        return read_span(self._local_paths(sid)[0], meta.image_spans[idx]), meta.keys[idx]

    # ------------------------------------------------------------------ backends
    def _backend(self, epoch: int, start: int, shards: np.ndarray, samples: np.ndarray):
        shards, samples = self._positions(start, shards, samples)
        if self.cfg.loader == "torch":
            from lmim.pipeline.torch_loader import torch_batches

            return self._guard(torch_batches(self, epoch, start, shards, samples), start, shards, samples)
        return self._guard(_dali_batches(self, epoch, start, shards, samples), start, shards, samples)

    def _guard(self, gen, start: int, shards: np.ndarray, samples: np.ndarray):
        """Turn a backend failure into a named error, or skip the undecodable sample (policy)."""
        try:
            yield from gen
        except SampleError as e:
            if self.cfg.on_error == "skip" and getattr(e, "where", None) is not None:
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
        except _BackendFailure as e:
            failed = e.batch
            lo = (failed - start) * self.batch_size
            loaded: dict[int, Any] = {}
            for pos in range(lo, min(lo + 3 * self.batch_size, len(shards))):  # the batch, and DALI's prefetch
                sid, idx = int(shards[pos]), int(samples[pos])
                data, key = self._sample(sid, idx, loaded)
                reason = decodable(data)
                if reason is not None:
                    err = SampleError(self.shard_name(sid), key, f"undecodable ({reason})")
                    err.where = (sid, idx)
                    if self.cfg.on_error == "raise":
                        raise err from e.__cause__
                    self._skip(err)
            names = sorted({self.shard_name(int(s)) for s in shards[lo:lo + self.batch_size]})
            raise DataError(f"the pipeline failed on batch {failed} of epoch {self.epoch} (shards "
                            f"{', '.join(names)}): {e.__cause__}") from e.__cause__
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()

    def _skip_shard(self, err: ShardError) -> None:
        sid = next((i for i, s in enumerate(self.manifest.shards) if s.name == err.shard), None)
        if sid is None or sid in self._bad_shards:
            return
        self._bad_shards.append(sid)
        self._meta.pop(sid, None)
        log.warning("skipping shard %s (data.on_error=skip; %d shard(s) skipped so far)", err, len(self._bad_shards))
        raise _Skipped()

    def _skip(self, err: SampleError) -> None:
        sid, idx = err.where
        self._bad.add((sid, idx))
        self._skipped_keys.append(err.key)
        log.warning("skipping %s (data.on_error=skip; %d skipped so far)", err, len(self._skipped_keys))
        raise _Skipped()

    # ------------------------------------------------------------------ batch assembly
    def crops(self, epoch: int, batch: int, widths: np.ndarray, heights: np.ndarray):
        c = self.cfg
        return crop_windows(widths, heights, self.seed, epoch, self.rank, batch, tuple(c.crop_scale),
                            tuple(c.crop_ratio), c.hflip)

    def _batch(self, epoch: int, b: int, images: torch.Tensor, keys: list[str], labels: np.ndarray) -> Batch:
        dev = self.device
        images = images.to(dev, non_blocking=True)
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
        lab = torch.as_tensor(np.asarray(labels, np.int64)).to(dev) if self.has_labels else None
        return Batch(images=images, visible=visible, target=target, labels=lab, keys=list(keys))


class _Skipped(Exception):
    """Internal: a sample was added to the skip list; the epoch is re-planned."""


class _BackendFailure(Exception):
    def __init__(self, batch: int):
        super().__init__(f"batch {batch}")
        self.batch = batch


# ---------------------------------------------------------------------- DALI backend
def _dali_batches(loader: Loader, epoch: int, start: int, shards: np.ndarray, samples: np.ndarray):
    """Yield (batch index, images on the device, keys, labels) for batches start.. of this plan."""
    from lmim.pipeline.dali import as_encoded, build_pipeline, to_torch
    from lmim.pipeline.resize import finish_batch

    B = loader.batch_size
    npos = len(shards)
    nb = math.ceil(npos / B)
    dev = loader.device
    device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else None
    tmp = None
    prefetcher = None
    pipe = None
    last: list[Any] = []
    state: dict[str, Any] = {}

    flips_of: dict[int, np.ndarray] = {}  # iteration -> flips (the CPU tail applies them)
    resize_in_dali = device_id is not None
    seen: dict[int, ShardMeta] = {}  # streaming: metadata of the shards the source has reached

    def meta(sid: int) -> ShardMeta:
        if loader.streaming:
            if sid not in seen:
                seen[sid] = prefetcher.get(sid).meta
            return seen[sid]
        return loader.local_meta(sid)

    def source(info):
        it = int(info.iteration)
        lo = it * B
        if loader.streaming and lo >= npos:
            return last[0]  # DALI's prefetch runs past the end: repeat, never consumed
        pos = np.arange(lo, lo + B) % npos if not loader.streaming else np.minimum(np.arange(lo, lo + B), npos - 1)
        sids, idxs = shards[pos], samples[pos]
        out: list[Any] = []
        try:
            if loader.streaming:
                datas = {}
                for s in sids:  # in plan order: the prefetcher hands shards out sequentially
                    if int(s) not in datas:
                        datas[int(s)] = prefetcher.get(int(s))
                        seen[int(s)] = datas[int(s)].meta
                out.append([as_encoded(datas[int(s)].images[int(i)]) for s, i in zip(sids, idxs)])
            metas = [meta(int(s)) for s in sids]
        except BaseException as e:
            state["error"] = e
            raise
        if loader.train:
            w = np.array([m.widths[int(i)] for m, i in zip(metas, idxs)])
            h = np.array([m.heights[int(i)] for m, i in zip(metas, idxs)])
            anchors, shapes, flips = loader.crops(epoch, start + it, w, h)
            out += [list(anchors), list(shapes)]
            if resize_in_dali:
                out.append(list(flips))
            else:
                flips_of[it] = flips
        last[:] = [tuple(out)]
        return tuple(out)

    try:
        if loader.streaming:
            seq = [s for s, _, _ in runs(shards)]
            fetch = loader.fetcher()
            prefetcher = Prefetcher(lambda sid: fetch.load(loader.manifest.shards[sid]), seq,
                                    max(1, loader.cfg.prefetch_shards))
            files = None
        else:
            tmp = tempfile.mkdtemp(prefix="lmim-idx-")
            paths, indices = [], []
            for n, (sid, lo, hi) in enumerate(runs(shards)):
                m = loader.local_meta(sid)
                idx_path = os.path.join(tmp, f"{n:06d}.idx")
                write_index(idx_path, [m.index_lines[int(i)] for i in samples[lo:hi]])
                paths.append(os.path.abspath(loader._local_paths(sid)[0]))
                indices.append(idx_path)
            files = (paths, indices)
        pipe = build_pipeline(batch_size=B, num_threads=loader.cfg.num_threads, device_id=device_id,
                              train=loader.train, out_size=loader.out_size, mean=loader.cfg.mean, std=loader.cfg.std,
                              source=source, files=files, resize_in_dali=resize_in_dali)
        for it in range(nb):
            try:
                (out,) = pipe.run()
            except Exception as e:
                if "error" in state:
                    raise state["error"] from None
                raise _BackendFailure(start + it) from e
            lo, hi = it * B, min((it + 1) * B, npos)
            if resize_in_dali:
                images = to_torch(out, dev)[: hi - lo]
            else:
                images = finish_batch([out.at(i) for i in range(hi - lo)], loader.out_size, loader.cfg.mean,
                                      loader.cfg.std, flips=flips_of.pop(it, None), eval_resize=not loader.train)
            sids, idxs = shards[lo:hi], samples[lo:hi]
            metas = [meta(int(s)) for s in sids]
            keys = [m.keys[int(i)] for m, i in zip(metas, idxs)]
            labels = np.array([m.labels[int(i)] for m, i in zip(metas, idxs)], np.int64)
            yield start + it, images, keys, labels
    finally:
        # Break the cycles (pipeline -> source callback -> state -> exception -> this frame) so the
        # pipeline is destroyed now, in this process, and not later by a forked child's GC.
        state.clear()
        last.clear()
        pipe = None  # noqa: F841
        if prefetcher is not None:
            prefetcher.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


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
