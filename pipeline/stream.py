"""Streaming reads of remote shards: each shard is one sequential whole-object read.

Object stores throttle request rates long before bandwidth, so a shard is fetched with a single
`fs.cat_file` (one GET for S3) instead of one ranged request per sample, checked against the
manifest's checksum, parsed in memory and handed to the pipeline. A background thread keeps up
to `prefetch_shards` parsed shards ready; transient errors are retried with exponential
back-off and jitter for up to `data.retry_budget_s` (10 minutes by default); an optional local cache (size-limited, evicting the least recently used shards)
saves re-downloads in later epochs.
"""
from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from lmim.pipeline.checksum import algorithm_of, checksum_of
from lmim.pipeline.errors import DataError, ShardError, StoreUnreachable
from lmim.pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo, join_url, read_manifest
from lmim.pipeline.shards import ShardData, parse_tar

log = logging.getLogger(__name__)

# How long a consumer waits for the next shard before re-checking that the fetcher is alive.
_POLL_S = 0.5


@dataclass
class StreamStats:
    shards_fetched: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    cache_hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def default_storage_options(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Bounded timeouts and no hidden SDK retries for S3 (we retry ourselves, visibly)."""
    opts = dict(storage_options)
    if url.startswith("s3://"):
        ck = dict(opts.get("config_kwargs", {}))
        ck.setdefault("connect_timeout", 10)
        ck.setdefault("read_timeout", 60)
        ck.setdefault("retries", {"max_attempts": 1})
        opts["config_kwargs"] = ck
        opts.setdefault("skip_instance_cache", True)  # a fresh client per process/thread: fork safety
    return opts


@dataclass(frozen=True)
class RetryPolicy:
    """How long a remote read keeps trying: a time budget, exponential back-off with jitter."""

    budget_s: float = 600.0
    max_retries: int | None = None   # also stop after this many retries (None: the budget alone)
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    def call(self, read: Callable[[], Any], name: str, url: str, on_retry: Callable[[], None] | None = None) -> Any:
        """read(), retried on network errors; StoreUnreachable once the budget is spent.

        Errors that waiting cannot mend go straight through: a missing object, data that is not
        what it should be, refused credentials.
        """
        rng = random.Random()  # private: the global `random` is training state (checkpointed)
        start, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                return read()
            except (FileNotFoundError, DataError, PermissionError):
                raise
            except Exception as e:  # network errors come in many types (aiohttp, botocore, OSError)
                elapsed = time.monotonic() - start
                delay = backoff_delay(attempt, self.backoff_s, self.backoff_max_s, rng)
                if (self.max_retries is not None and attempt > self.max_retries) or elapsed + delay > self.budget_s:
                    raise StoreUnreachable(name, f"network error after {attempt} attempts over {elapsed:.0f} s "
                                                 f"(retry budget {self.budget_s:g} s, data.retry_budget_s) reading "
                                                 f"{url}: {type(e).__name__}: {e}; when the store answers again, "
                                                 "continue with resume=auto") from e
                if on_retry is not None:
                    on_retry()
                log.warning("reading %s failed (%s); retry %d in %.1f s (%.0f of %g s budget used)", url, e,
                            attempt, delay, elapsed, self.budget_s)
                time.sleep(delay)


def read_manifest_retrying(root: str, storage_options: dict[str, Any], retry: RetryPolicy) -> Manifest:
    """read_manifest for a remote dataset, with the shard reads' timeouts and retry policy."""
    opts = default_storage_options(root, storage_options)
    return retry.call(lambda: read_manifest(root, opts), MANIFEST_NAME, join_url(root, MANIFEST_NAME))


def verify_shard_checksum(info: ShardInfo, digest: str) -> None:
    """The one integrity check, local and remote: `digest` (of the shard's bytes) must be the manifest's."""
    if digest != info.checksum:
        raise ShardError(info.name, f"checksum mismatch: {digest[:21]}..., the manifest says "
                                    f"{info.checksum[:21]}... (the shard changed or is corrupt; rebuild it "
                                    "with `lmim shard`, or check it with `lmim verify`)")


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt `attempt` (1, 2, ...): exponential, capped, with jitter.

    base * 2^(attempt-1) capped at `cap_s`, then a uniform draw from its upper half, so that many
    ranks throttled together do not retry in lockstep, and the wait still grows.
    """
    d = min(cap_s, base_s * 2 ** (attempt - 1))
    return rng.uniform(d / 2, d)


class ShardFetcher:
    """Fetch whole shards through fsspec with retries, a checksum check and an optional cache."""

    def __init__(self, root: str, storage_options: dict[str, Any], *, retry: RetryPolicy = RetryPolicy(),
                 cache_dir: str | None = None, cache_max_bytes: int = 0, stats: StreamStats | None = None):
        import fsspec

        self.root = root
        self.fs, self.base = fsspec.core.url_to_fs(root, **default_storage_options(root, storage_options))
        self.retry = retry
        self.cache_dir = cache_dir
        self.cache_max_bytes = cache_max_bytes
        self.stats = stats or StreamStats()
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    def _path(self, name: str) -> str:
        return join_url(self.base, name)

    def _cached(self, info: ShardInfo) -> bytes | None:
        if not self.cache_dir:
            return None
        path = os.path.join(self.cache_dir, info.checksum.replace(":", "-") + ".tar")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        if len(data) != info.bytes:
            return None
        os.utime(path)  # LRU: touch on use
        self.stats.add(cache_hits=1)
        return data

    def _store(self, info: ShardInfo, data: bytes) -> None:
        if not self.cache_dir or self.cache_max_bytes <= 0 or len(data) > self.cache_max_bytes:
            return
        path = os.path.join(self.cache_dir, info.checksum.replace(":", "-") + ".tar")
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # never a half-written cache entry
        entries = []
        for n in os.listdir(self.cache_dir):
            if n.endswith(".tar"):
                p = os.path.join(self.cache_dir, n)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(e[1] for e in entries)
        for _, size, p in sorted(entries):
            if total <= self.cache_max_bytes:
                break
            if p != path:
                try:
                    os.remove(p)
                    total -= size
                except OSError:
                    pass

    def fetch(self, info: ShardInfo) -> bytes:
        """The shard's bytes, verified against the manifest (size and checksum)."""
        data = self._cached(info)
        if data is not None:
            return data
        url = join_url(self.root, info.name)
        try:
            data = self.retry.call(lambda: self.fs.cat_file(self._path(info.name)), info.name, url,
                                   on_retry=lambda: self.stats.add(retries=1))
        except FileNotFoundError:
            raise ShardError(info.name, f"missing: {url} does not exist "
                                        "(the dataset is incomplete; re-run `lmim shard`)") from None
        self.stats.add(shards_fetched=1, bytes_fetched=len(data))
        if len(data) != info.bytes:
            raise ShardError(info.name, f"truncated: read {len(data)} bytes, the manifest says {info.bytes}")
        verify_shard_checksum(info, checksum_of(data, algorithm_of(info.checksum)))
        self._store(info, data)
        return data

    def load(self, info: ShardInfo) -> ShardData:
        return parse_tar(self.fetch(info), info.name, info.samples)


class Prefetcher:
    """Fetch a fixed sequence of shards in a background thread, at most `depth` ahead.

    `get(shard_id)` must be called in sequence order (repeats of the current shard are fine).
    Errors in the thread are re-raised in the consumer; nothing ever waits forever.
    """

    def __init__(self, load: Callable[[int], ShardData], sequence: Sequence[int], depth: int):
        self._load = load
        self._sequence = list(sequence)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._current: tuple[int, ShardData] | None = None
        self._thread = threading.Thread(target=self._run, name="lmim-shard-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for sid in self._sequence:
            if self._stop.is_set():
                return
            try:
                item: Any = (sid, self._load(sid))
            except BaseException as e:  # hand every failure to the consumer
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self, sid: int) -> ShardData:
        if self._current is not None and self._current[0] == sid:
            return self._current[1]
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise DataError(f"shard prefetcher ended before shard {sid} was delivered")
                continue
            if isinstance(item, BaseException):
                raise item
            got, data = item
            if got != sid:
                raise DataError(f"shard prefetcher out of order: wanted shard {sid}, got {got}")
            self._current = (sid, data)
            return data

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
