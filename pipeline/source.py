"""The shards of one dataset, as loader backends read them (`lmim.pipeline.backend`).

Local shards are read in place: a shard's metadata comes from its `.idx` and its samples'
`.json`/`.cls`, checked against the manifest (and, with data.verify_local, against its checksum)
once per process before first use; an image is read by its byte span. Remote shards (and local
ones with data.reader=stream) are fetched whole, verified and parsed in memory
(`lmim.pipeline.stream`), a few ahead of use by a `Prefetcher`.
"""
from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

from lmim.pipeline.errors import ShardError
from lmim.pipeline.format.checksum import algorithm_of, checksum_of_file, verify_shard_checksum
from lmim.pipeline.format.manifest import Manifest
from lmim.pipeline.order import runs
from lmim.pipeline.shards import ShardData, ShardMeta, read_local_meta, read_span
from lmim.pipeline.storage import RetryPolicy, join, local_path
from lmim.pipeline.stream import Prefetcher, ShardFetcher, StreamStats

__all__ = ["MixedSource", "PlanReader", "ShardSource"]


class ShardImages(Protocol):
    """A shard's metadata and its samples' encoded images, by index in the shard."""

    meta: ShardMeta

    @property
    def images(self) -> Sequence[bytes]: ...


class PlanReader(Protocol):
    """The shards of a plan, handed out in plan order (`get` in the order the plan visits them)."""

    def get(self, sid: int) -> ShardImages: ...

    def close(self) -> None: ...


class _Spans:
    """The encoded images of a local shard, each read by its byte span when asked for. The file is
    opened on first use and again after `close()` (a feed may still read a shard it moved past)."""

    def __init__(self, tar_path: str, spans: list[tuple[int, int]]):
        self._path, self._spans = tar_path, spans
        self._fd: int | None = None

    def __getitem__(self, idx: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY)
        offset, size = self._spans[idx]
        return os.pread(self._fd, size, offset)

    def __len__(self) -> int:
        return len(self._spans)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class _LocalShard:
    def __init__(self, meta: ShardMeta, tar_path: str):
        self.meta = meta
        self.images = _Spans(tar_path, meta.image_spans)


class _LocalReader:
    """Local shards read in place, at most two shard files open at once (a plan visits a dataset's
    shards in runs, so a file is rarely opened twice)."""

    def __init__(self, source: "ShardSource"):
        self._source = source
        self._open: dict[int, _LocalShard] = {}

    def get(self, sid: int) -> ShardImages:
        shard = self._open.get(sid)
        if shard is None:
            while len(self._open) >= 2:
                self._open.pop(next(iter(self._open))).images.close()
            shard = self._open[sid] = _LocalShard(self._source.meta(sid), self._source.tar_path(sid))
        return shard

    def close(self) -> None:
        for shard in self._open.values():
            shard.images.close()
        self._open.clear()


class ShardSource:
    """Names, metadata, local paths and spans, and whole-shard fetches of a dataset's shards.

    Args:
        manifest: the dataset's manifest; shard ids are indices into its shard list.
        url: the dataset root.
        streaming: shards are fetched whole (`load`) rather than read in place (`meta`, `image`).
        verify_local: check a local shard's checksum before its first use in this process.
        storage_options, retry, cache_dir, cache_max_bytes: the whole-shard fetcher's (`ShardFetcher`).
        prefetch_depth: whole shards fetched ahead of use.
    """

    def __init__(self, manifest: Manifest, url: str, *, streaming: bool, verify_local: bool,
                 storage_options: dict[str, Any], retry: RetryPolicy, cache_dir: str | None = None,
                 cache_max_bytes: int = 0, prefetch_depth: int = 2):
        self.manifest = manifest
        self.url = url
        self.streaming = streaming
        self.verify_local = verify_local
        self.prefetch_depth = max(1, prefetch_depth)
        self.stats = StreamStats()
        self._fetcher_args = dict(storage_options=storage_options, retry=retry, cache_dir=cache_dir,
                                  cache_max_bytes=cache_max_bytes)
        self._fetcher: ShardFetcher | None = None
        self._meta: dict[int, ShardMeta] = {}   # local shards checked in this process

    def name(self, sid: int) -> str:
        return self.manifest.shards[sid].name

    def id_of(self, name: str) -> int | None:
        """The shard id of the shard named `name` (None: not in the manifest)."""
        return next((i for i, s in enumerate(self.manifest.shards) if s.name == name), None)

    # ------------------------------------------------------------------ local shards, read in place
    def tar_path(self, sid: int) -> str:
        return join(local_path(self.url), self.manifest.shards[sid].name)

    def meta(self, sid: int) -> ShardMeta:
        """A local shard's metadata, checked against the manifest on first use in this process."""
        meta = self._meta.get(sid)
        if meta is None:
            info = self.manifest.shards[sid]
            tar = self.tar_path(sid)
            meta = read_local_meta(tar, join(local_path(self.url), info.index), info.name, info.samples)
            if os.path.getsize(tar) != info.bytes:
                raise ShardError(info.name, f"truncated or changed: {os.path.getsize(tar)} bytes on disk, the manifest "
                                            f"says {info.bytes} (rebuild it with `lmim shard SRC DST`)")
            # One integrity policy for both paths: remote shards are checked on every fetch, local
            # ones once per process before their first use (XXH3 hashes at tens of GB/s, so this
            # costs one extra read of the shard, not a decode).
            if self.verify_local and info.checksum:
                verify_shard_checksum(info, checksum_of_file(tar, algorithm_of(info.checksum)))
            self._meta[sid] = meta
        return meta

    def image(self, sid: int, idx: int) -> bytes:
        """The encoded image of sample `idx` of a local shard."""
        return read_span(self.tar_path(sid), self.meta(sid).image_spans[idx])

    def forget(self, sid: int | None = None) -> None:
        """Drop the checked metadata of shard `sid` (of every shard when None)."""
        if sid is None:
            self._meta.clear()
        else:
            self._meta.pop(sid, None)

    # ------------------------------------------------------------------ whole shards, fetched
    def _fetcher_or_new(self) -> ShardFetcher:
        if self._fetcher is None:
            self._fetcher = ShardFetcher(self.url, stats=self.stats, **self._fetcher_args)
        return self._fetcher

    def load(self, sid: int) -> ShardData:
        """Shard `sid` fetched whole, verified and parsed (retried by the fetcher's policy)."""
        return self._fetcher_or_new().load(self.manifest.shards[sid])

    def prefetch(self, sequence: Iterable[int]) -> Prefetcher:
        """A background thread loading the shards of `sequence`, in order, `prefetch_depth` ahead."""
        fetcher = self._fetcher_or_new()  # made here, not in the thread
        return Prefetcher(lambda sid: fetcher.load(self.manifest.shards[sid]), list(sequence), self.prefetch_depth)

    # ------------------------------------------------------------------ plans fed as encoded bytes
    num_sources = 1

    @property
    def feeds_bytes(self) -> bool:
        """Backends hand the decoder encoded bytes (True), or DALI's reader reads the tars itself."""
        return self.streaming

    def streamed(self, sid: int) -> bool:
        """Shard `sid` is fetched whole (True) or read in place."""
        return self.streaming

    def open_plan(self, shards: np.ndarray) -> PlanReader:
        """A reader of the plan's shards in plan order: fetched `prefetch_depth` ahead, or read in place."""
        if self.streaming:
            return self.prefetch(sid for sid, _, _ in runs(shards))
        return _LocalReader(self)

    # ------------------------------------------------------------------ diagnosis
    def samples(self, positions: Iterable[tuple[int, int]]) -> Iterator[tuple[bytes, str]]:
        """(encoded image, key) of each (shard, sample) position, read again (to pinpoint a failed batch)."""
        return _read_samples(self, positions)


def _read_samples(source: "ShardSource | MixedSource", positions: Iterable[tuple[int, int]]) -> Iterator[tuple[bytes, str]]:
    loaded: dict[int, ShardData] = {}  # a fetched shard is fetched once for all its positions
    for sid, idx in positions:
        if source.streamed(sid):
            if sid not in loaded:
                loaded[sid] = source.load(sid)
            yield loaded[sid].images[idx], loaded[sid].meta.keys[idx]
        else:
            yield source.image(sid, idx), source.meta(sid).keys[idx]


class MixedSource:
    """The shards of several datasets (`data.sources`) under one numbering: source i's shard k is
    `offsets[i] + k`. Shards are named `<dataset URL>/<shard>` so that errors, skip lists and
    logs say which dataset a shard belongs to; each dataset is read as `ShardSource` reads it."""

    feeds_bytes = True  # a plan interleaves the sources sample by sample: DALI is fed encoded bytes

    def __init__(self, sources: list[ShardSource]):
        self.sources = sources
        self.num_sources = len(sources)
        self.offsets = np.cumsum([0] + [len(s.manifest.shards) for s in sources])
        self._names = [join(src.url, info.name) for src in sources for info in src.manifest.shards]

    def index_of(self, sid: int) -> int:
        """The source (dataset) that shard `sid` belongs to."""
        return int(np.searchsorted(self.offsets, sid, side="right")) - 1

    def _locate(self, sid: int) -> tuple[ShardSource, int]:
        i = self.index_of(sid)
        return self.sources[i], int(sid - self.offsets[i])

    def named(self, sid: int, err: ShardError) -> ShardError:
        """`err` (raised by a dataset's own source, naming the shard alone) naming `<URL>/<shard>`."""
        return type(err)(self.name(sid), err.message)

    @property
    def stats(self) -> StreamStats:
        total = StreamStats()
        for src in self.sources:
            total.add(**{f.name: getattr(src.stats, f.name) for f in fields(StreamStats) if not f.name.startswith("_")})
        return total

    def name(self, sid: int) -> str:
        return self._names[sid]

    def id_of(self, name: str) -> int | None:
        return next((i for i, n in enumerate(self._names) if n == name), None)

    def streamed(self, sid: int) -> bool:
        return self._locate(sid)[0].streaming

    def tar_path(self, sid: int) -> str:
        src, k = self._locate(sid)
        return src.tar_path(k)

    def meta(self, sid: int) -> ShardMeta:
        src, k = self._locate(sid)
        try:
            return src.meta(k)
        except ShardError as e:
            raise self.named(sid, e) from e

    def image(self, sid: int, idx: int) -> bytes:
        src, k = self._locate(sid)
        return src.image(k, idx)

    def load(self, sid: int) -> ShardData:
        src, k = self._locate(sid)
        try:
            return src.load(k)
        except ShardError as e:
            raise self.named(sid, e) from e

    def forget(self, sid: int | None = None) -> None:
        if sid is None:
            for src in self.sources:
                src.forget()
        else:
            src, k = self._locate(sid)
            src.forget(k)

    def open_plan(self, shards: np.ndarray) -> PlanReader:
        """Each dataset's reader over its own part of the plan (a remote one prefetches its own shards)."""
        which = np.searchsorted(self.offsets, shards, side="right") - 1
        return _MixedReader(self, [src.open_plan(shards[which == i] - self.offsets[i])
                                   for i, src in enumerate(self.sources)])

    def samples(self, positions: Iterable[tuple[int, int]]) -> Iterator[tuple[bytes, str]]:
        """(encoded image, key) of each (shard, sample) position, read again (to pinpoint a failed batch)."""
        return _read_samples(self, positions)


class _MixedReader:
    def __init__(self, source: MixedSource, readers: list[PlanReader]):
        self._source, self._readers = source, readers

    def get(self, sid: int) -> ShardImages:
        src = self._source
        i = src.index_of(sid)
        try:
            return self._readers[i].get(int(sid - src.offsets[i]))
        except ShardError as e:
            raise src.named(sid, e) from e

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
