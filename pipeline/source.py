"""The shards of one dataset, as loader backends read them (`lmim.pipeline.backend`).

Local shards are read in place: a shard's metadata comes from its `.idx` and its samples'
`.json`/`.cls`, checked against the manifest (and, with data.verify_local, against its checksum)
once per process before first use; an image is read by its byte span. Remote shards (and local
ones with data.reader=stream) are fetched whole, verified and parsed in memory
(`lmim.pipeline.stream`), a few ahead of use by a `Prefetcher`.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from lmim.pipeline.errors import ShardError
from lmim.pipeline.format.checksum import algorithm_of, checksum_of_file, verify_shard_checksum
from lmim.pipeline.format.manifest import Manifest
from lmim.pipeline.shards import ShardData, ShardMeta, read_local_meta, read_span
from lmim.pipeline.storage import RetryPolicy, join, local_path
from lmim.pipeline.stream import Prefetcher, ShardFetcher, StreamStats

__all__ = ["ShardSource"]


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
                                            f"says {info.bytes} (rebuild it with `lmim shard`)")
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

    # ------------------------------------------------------------------ diagnosis
    def samples(self, positions: Iterable[tuple[int, int]]) -> Iterator[tuple[bytes, str]]:
        """(encoded image, key) of each (shard, sample) position, read again (to pinpoint a failed batch)."""
        loaded: dict[int, ShardData] = {}
        for sid, idx in positions:
            if self.streaming:
                if sid not in loaded:
                    loaded[sid] = self.load(sid)
                yield loaded[sid].images[idx], loaded[sid].meta.keys[idx]
            else:
                yield self.image(sid, idx), self.meta(sid).keys[idx]
