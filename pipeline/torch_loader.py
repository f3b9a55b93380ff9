"""The plain PyTorch loader (`data.loader="torch"`): PIL + torchvision transforms in DataLoader workers.

It is the benchmark baseline (how the reference implementation and most users load images)
and the path for machines without DALI. It follows the same plan as the DALI loader (same
samples, same crop windows and flips, same masks), so only the decode/resize engine differs.
Worker w of n builds batches start + w, start + w + n, ...; the DataLoader takes one item from
each worker in turn, so batches come out in order and resume is exact here too.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmim.pipeline.errors import DataError, SampleError
from lmim.pipeline.forking import fork_safe_gc


class _Batches(IterableDataset):
    def __init__(self, loader, epoch: int, start: int, shards: np.ndarray, samples: np.ndarray):
        self.loader, self.epoch, self.start = loader, epoch, start
        self.shards, self.samples = shards, samples
        self._cache: dict[int, Any] = {}

    def _shard(self, sid: int):
        """(meta, image getter) for a shard; remote shards are fetched whole (2 kept per worker)."""
        ld = self.loader
        if sid not in self._cache:
            if ld.streaming:
                data = ld.fetcher().load(ld.manifest.shards[sid])
                if len(self._cache) >= 2:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[sid] = (data.meta, data.images.__getitem__)
            else:
                from lmim.pipeline.shards import read_span

                meta = ld.local_meta(sid)
                path = ld._local_paths(sid)[0]
                self._cache[sid] = (meta, lambda i, m=meta, p=path: read_span(p, m.image_spans[i]))
        return self._cache[sid]

    def _one(self, b: int):
        from PIL import Image, ImageOps

        from lmim._torchvision_compat import ensure_torchvision_importable

        ensure_torchvision_importable()  # torchvision directly, not through timm: see that module
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        ld = self.loader
        bsz = ld.batch_size
        lo, hi = (b - self.start) * bsz, min((b - self.start + 1) * bsz, len(self.shards))
        sids, idxs = self.shards[lo:hi], self.samples[lo:hi]
        metas = [self._shard(int(s))[0] for s in sids]
        if ld.train:
            w = np.array([m.widths[int(i)] for m, i in zip(metas, idxs)])
            h = np.array([m.heights[int(i)] for m, i in zip(metas, idxs)])
            anchors, shapes, flips = ld.crops(self.epoch, b, w, h)
        S = ld.out_size
        mean, std = list(ld.cfg.mean), list(ld.cfg.std)
        out = torch.empty(hi - lo, 3, S, S)
        for j, (s, i) in enumerate(zip(sids, idxs)):
            s, i = int(s), int(i)
            meta, get = self._shard(s)
            import io

            try:
                # Upright as displayed, like DALI's decoders and the sizes in the sample's .json.
                img = ImageOps.exif_transpose(Image.open(io.BytesIO(get(i)))).convert("RGB")
            except Exception as e:  # PIL raises many types for corrupt data
                return ("error", s, i, meta.keys[i], f"undecodable ({type(e).__name__}: {e})")
            if ld.train:
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
        return (b, out, keys, labels)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        torch.set_num_threads(1)  # one decode per worker process: workers are the parallelism
        nb = math.ceil(len(self.shards) / self.loader.batch_size)
        for b in range(self.start + wid, self.start + nb, nw):
            try:
                item = self._one(b)
            except DataError as e:  # a shard-level fault: hand it over with its type intact
                yield ("raise", e)
                return
            yield item
            if item[0] == "error":
                return


def torch_batches(loader, epoch: int, start: int, shards: np.ndarray, samples: np.ndarray):
    """Yield (batch index, images, keys, labels) like the DALI backend; raise SampleError on a bad image."""
    ds = _Batches(loader, epoch, start, shards, samples)
    nw = max(0, int(loader.cfg.num_threads))
    dl = DataLoader(ds, batch_size=None, num_workers=nw, pin_memory=loader.device.type == "cuda",
                    persistent_workers=False, multiprocessing_context="fork" if nw else None)
    with fork_safe_gc():  # the workers are forked here; see pipeline/forking.py
        it = iter(dl)
    try:
        for item in it:
            if item[0] == "raise":
                raise item[1]
            if item[0] == "error":
                _, sid, idx, key, msg = item
                err = SampleError(loader.shard_name(sid), key, msg)
                err.where = (sid, idx)
                raise err
            yield item
    finally:
        del it
