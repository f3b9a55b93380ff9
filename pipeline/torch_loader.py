"""The plain PyTorch loader (`data.loader="torch"`): PIL + torchvision transforms in DataLoader workers.

It is the benchmark baseline (how the reference implementation and most users load images)
and the path for machines without DALI. It follows the same plan as the DALI loader (same
samples, same crop windows and flips, same masks), so only the decode/resize engine differs.
Worker w of n builds batches start + w, start + w + n, ...; the DataLoader takes one item from
each worker in turn, so batches come out in order and resume is exact here too.
"""
from __future__ import annotations

import io
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmim.pipeline.backend import DecodedBatch, EpochPlan, GeneratorBackend, ImageSpec
from lmim.pipeline.errors import DataError, SampleError
from lmim.pipeline.forking import fork_safe_gc
from lmim.pipeline.shards import ShardMeta
from lmim.pipeline.source import MixedSource, ShardSource


class _Batches(IterableDataset):
    """The batches of one worker. A failure travels as a value (the exception itself, which
    pickles with its fields): DataLoader re-raises a worker's exception as a new one built from
    its message alone, which would lose its type and where it happened."""

    def __init__(self, plan: EpochPlan, source: ShardSource | MixedSource, spec: ImageSpec):
        self.plan, self.source, self.spec = plan, source, spec
        self._cache: dict[int, tuple[ShardMeta, Callable[[int], bytes]]] = {}

    def _shard(self, sid: int) -> tuple[ShardMeta, Callable[[int], bytes]]:
        """(meta, image getter) for a shard; remote shards are fetched whole (one per dataset, plus one,
        kept per worker: a mixture's batches interleave its datasets)."""
        src = self.source
        if sid not in self._cache:
            if src.streamed(sid):
                data = src.load(sid)
                if len(self._cache) >= src.num_sources + 1:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[sid] = (data.meta, data.images.__getitem__)
            else:
                self._cache[sid] = (src.meta(sid), lambda i, s=sid: src.image(s, i))
        return self._cache[sid]

    def _one(self, b: int) -> DecodedBatch | SampleError:
        from PIL import Image, ImageOps

        from lmim._torchvision_compat import ensure_torchvision_importable

        ensure_torchvision_importable()  # torchvision directly, not through timm: see that module
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        plan, spec = self.plan, self.spec
        lo, hi = plan.span(b)
        sids, idxs = plan.shards[lo:hi], plan.samples[lo:hi]
        metas = [self._shard(int(s))[0] for s in sids]
        if spec.train:
            w = np.array([m.widths[int(i)] for m, i in zip(metas, idxs)])
            h = np.array([m.heights[int(i)] for m, i in zip(metas, idxs)])
            anchors, shapes, flips = plan.windows(b, w, h)
        S = spec.size
        mean, std = list(spec.mean), list(spec.std)
        out = torch.empty(hi - lo, 3, S, S)
        for j, (s, i) in enumerate(zip(sids, idxs)):
            s, i = int(s), int(i)
            meta, get = self._shard(s)
            try:
                # Upright as displayed, like DALI's decoders and the sizes in the sample's .json.
                img = ImageOps.exif_transpose(Image.open(io.BytesIO(get(i)))).convert("RGB")
            except Exception as e:  # PIL raises many types for corrupt data
                return SampleError(self.source.name(s), meta.keys[i], f"undecodable ({type(e).__name__}: {e})",
                                   position=(s, i))
            if spec.train:
                x, y = anchors[j]
                cw, ch = shapes[j]
                img = TF.resized_crop(img, int(y), int(x), int(ch), int(cw), [S, S],
                                      interpolation=InterpolationMode.BICUBIC, antialias=True)
                if flips[j]:
                    img = TF.hflip(img)
            else:
                img = TF.resize(img, int(S / 0.875), interpolation=InterpolationMode.BICUBIC, antialias=True)
                img = TF.center_crop(img, [S, S])
            out[j] = TF.normalize(TF.to_tensor(img), mean, std)
        keys = [m.keys[int(i)] for m, i in zip(metas, idxs)]
        labels = np.array([m.labels[int(i)] for m, i in zip(metas, idxs)], np.int64)
        return DecodedBatch(b, out, keys, labels)

    def __iter__(self) -> Iterator[DecodedBatch | DataError]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        torch.set_num_threads(1)  # one decode per worker process: workers are the parallelism
        plan = self.plan
        for b in range(plan.start + wid, plan.start + plan.num_batches, nw):
            try:
                item = self._one(b)
            except DataError as e:  # a shard-level fault: handed over with its type intact
                yield e
                return
            yield item
            if isinstance(item, DataError):
                return


class TorchBatches(GeneratorBackend):
    """One epoch's plan through DataLoader workers: `DecodedBatch`es in plan order; a worker's
    `ShardError` or `SampleError` is raised here as itself."""

    def __init__(self, plan: EpochPlan, source: ShardSource | MixedSource, spec: ImageSpec):
        self._dataset = _Batches(plan, source, spec)
        self._workers = max(0, int(spec.threads))
        self._pin = spec.device.type == "cuda"

    def _batches(self) -> Iterator[DecodedBatch]:
        nw = self._workers
        dl = DataLoader(self._dataset, batch_size=None, num_workers=nw, pin_memory=self._pin,
                        persistent_workers=False, multiprocessing_context="fork" if nw else None)
        with fork_safe_gc():  # the workers are forked here; see pipeline/forking.py
            it = iter(dl)
        try:
            for item in it:
                if isinstance(item, DataError):
                    raise item
                yield item
        finally:
            del it  # the last reference: the workers shut down now
