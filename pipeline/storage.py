"""Where data lives: a local folder or an object-store prefix, behind one interface.

Every reader and writer of datasets and corpora gets its file system here, so one URL always
gets one set-up, whoever opens it:
- `is_remote` / `local_path` / `join`: which URLs go through the network, and how names join;
- `filesystem`: URL -> (fsspec file system, path), with the same S3 timeouts for every caller
  (a manifest read that could hang while the shard reads beside it time out is the bug this
  module exists to prevent);
- `RetryPolicy`: how long a remote read keeps trying, with back-off and jitter;
- `write_atomic` / `move_into_place`: a local file is either the old one or the whole new one;
- `Store`: a root URL and the names under it (read, write atomically, upload, list, remove).
Nothing outside this module tests a URL for "://" or builds a file system.
"""
from __future__ import annotations

import copy
import errno
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from lmim.pipeline.errors import DataError, StoreUnreachable, store_client_credentials_error

if TYPE_CHECKING:  # pragma: no cover
    from fsspec import AbstractFileSystem

__all__ = ["S3_CONFIG", "RetryPolicy", "Store", "as_os_error", "backoff_delay", "file_mode_for_new_files", "filesystem", "folder_obstacle", "has_scheme", "is_remote", "join",
           "local_path", "move_into_place", "storage_options_for", "write_atomic"]

log = logging.getLogger(__name__)

# Bounded waits, and no retries hidden inside the AWS SDK: a stalled store costs one timeout per
# attempt, and every retry is `RetryPolicy`'s, visible in the log and the loader's counters.
# (s3fs still retries throttling and dropped connections a few times inside one attempt.)
S3_CONFIG: dict[str, Any] = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 1}}
_S3_SCHEMES = ("s3://", "s3a://")


# ---------------------------------------------------------------------- URLs
def has_scheme(url: str) -> bool:
    """Whether `url` names a scheme (`s3://...`, `file://...`) rather than being a plain path."""
    return "://" in url


def is_remote(url: str) -> bool:
    """Whether `url` is read through a network file system: any scheme but `file://`."""
    return has_scheme(url) and not url.startswith("file://")


def local_path(url: str) -> str:
    """The path of a local URL: `file:///data/x` -> `/data/x`; a plain path is returned as it is."""
    return url[len("file://"):] if url.startswith("file://") else url


def join(root: str, name: str) -> str:
    """`name` (relative, `/`-separated) under `root` (a local path or a URL)."""
    return root.rstrip("/") + "/" + name


def storage_options_for(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options every opening of `url` gets: the user's, plus S3's timeouts where unset."""
    opts = dict(storage_options or {})
    if url.startswith(_S3_SCHEMES):
        ck = dict(opts.get("config_kwargs", {}))
        for key, value in S3_CONFIG.items():
            ck.setdefault(key, copy.deepcopy(value))
        opts["config_kwargs"] = ck
        # A client of our own, not fsspec's shared instance: one whose connections a forked parent
        # opened, or whose server went away, is never handed to another reader.
        opts.setdefault("skip_instance_cache", True)
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple["AbstractFileSystem", str]:
    """(fsspec file system, path within it) for `url`: the one place a file system is built.

    Raises ValueError (unknown scheme) or ImportError (its package is not installed).
    """
    import fsspec

    return fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))


# ---------------------------------------------------------------------- retries
def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt `attempt` (1, 2, ...): exponential, capped, with jitter.

    base * 2^(attempt-1) capped at `cap_s`, then a uniform draw from its upper half, so that many
    ranks throttled together do not retry in lockstep, and the wait still grows.
    """
    d = min(cap_s, base_s * 2 ** (attempt - 1))
    return rng.uniform(d / 2, d)


@dataclass(frozen=True)
class RetryPolicy:
    """How long a remote read keeps trying: a time budget, exponential back-off with jitter."""

    budget_s: float = 600.0
    max_retries: int | None = None   # also stop after this many retries (None: the budget alone)
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    def call(self, read: Callable[[], Any], name: str, url: str, on_retry: Callable[[], None] | None = None) -> Any:
        """read(), retried on network errors; StoreUnreachable (naming `name`) once the budget is spent.

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
                if store_client_credentials_error(e) is not None:  # no credentials: no wait will bring them
                    raise
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


# ---------------------------------------------------------------------- local atomic writes
def file_mode_for_new_files() -> int:
    """The mode `open()` gives a new file under this process's umask (0o644 under the usual 022).

    Writers that go through a private temporary file (safetensors' save_file, mkstemp) create 0o600
    files; chmod to this so a checkpoint or an export is as readable as any other file the user writes
    (a group sharing a run folder). The umask comes from /proc: os.umask() can only be read by
    setting it, which would race with threads creating files meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def folder_obstacle(path: str) -> tuple[str, str] | None:
    """Why the local folder `path` could not be created or written later, judged by its nearest
    existing ancestor: ("file", that ancestor) when it is a file, ("permission", it) when it cannot
    be written; None when the folder exists or can be made."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return "file", probe
    if not os.access(probe, os.W_OK | os.X_OK):
        return "permission", probe
    return None


# Free bytes below which a failed write is put down to a full disk (the writer's own error may not say so).
_NEARLY_FULL_BYTES = 64 * 2**20
_DISK_FULL_WORDS = ("no space left", "disk quota", "file too large")


def as_os_error(err: BaseException, path: str | os.PathLike) -> BaseException:
    """A failed write reported by a library in its own error type, as the OSError it was, naming `path`.

    safetensors raises `SafetensorError("... Permission denied (os error 13) ...")` and torch.save a
    `RuntimeError("[enforce fail at inline_container.cc] ... unexpected pos ...")` when the disk fills
    mid-write. Neither is an OSError, so without this the user reads "a bug" and a traceback where
    the remedy is a writable path or free space. Returns `err` itself when it is already an OSError
    or nothing says it was the file system."""
    if isinstance(err, OSError):
        return err
    text = str(err)
    code = re.search(r"os error (\d+)", text)
    if code:
        n = int(code.group(1))
        return OSError(n, os.strerror(n), str(path))
    nearly_full = False
    try:
        nearly_full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < _NEARLY_FULL_BYTES
    except OSError:
        pass
    if nearly_full or any(w in text.lower() for w in _DISK_FULL_WORDS):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return err


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, write: Callable[[IO[bytes]], Any], fsync: bool) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_atomic(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Write a local file so that readers find the old file or the whole new one, never a part.

    The data goes to a temporary name in the same folder (a rename is atomic only within one
    file system), flushed to disk unless fsync=False, then renamed over `path`. The temporary
    name is unique per host, process and thread: build parts may share a network folder, and
    two threads may write the same cache entry. A failed write leaves no temporary file behind.
    """
    _write_atomic(path, lambda f: f.write(data), fsync)


def move_into_place(src: str, dst: str, *, fsync: bool = True) -> None:
    """Rename the finished local file `src` to `dst` (same file system), flushed to disk first unless fsync=False."""
    if fsync:
        _fsync_file(src)
    os.replace(src, dst)


# ---------------------------------------------------------------------- a root and its names
class Store:
    """A root URL (a local folder, an object-store prefix, or a single file) and the names under it.

    Names are relative, `/`-separated; "" is the root itself. Local: plain `os` calls on the
    absolute path, atomic writes by temporary name + fsync + rename. Remote: one fsspec file
    system from `filesystem`; a PUT becomes visible only when complete, so one upload is atomic.

    Args:
        root: local path, `file://` URL or fsspec URL.
        storage_options: fsspec options (they override the AWS environment); S3's timeouts are
            added where unset (`storage_options_for`).
        retry: how remote reads retry (`read_bytes`); None: one attempt. Local reads never
            retry: waiting does not mend a local file system's error.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None, *,
                 retry: RetryPolicy | None = None):
        self.url = root.rstrip("/") or root
        self.local = not is_remote(root)
        self.storage_options = dict(storage_options or {})
        self.retry = retry
        self.fs: AbstractFileSystem | None
        if self.local:
            self.fs = None
            self.path = os.path.abspath(local_path(root))
        else:
            self.fs, path = filesystem(root, self.storage_options)
            self.path = path.rstrip("/")

    def _p(self, name: str = "") -> str:
        if not name:
            return self.path
        return os.path.join(self.path, name) if self.local else f"{self.path}/{name}"

    def url_of(self, name: str = "") -> str:
        """`name`'s URL as the user wrote the root (for messages and for readers that take URLs)."""
        return join(self.url, name) if name else self.url

    def _fresh(self, path: str) -> str:
        # other processes (build workers, other parts) write here: never answer from a listing cache
        self.fs.invalidate_cache(path)
        return path

    # ------------------------------------------------------------------ reading
    def exists(self, name: str = "") -> bool:
        if self.local:
            return os.path.exists(self._p(name))
        return self.fs.exists(self._fresh(self._p(name)))

    def is_dir(self, name: str = "") -> bool:
        if self.local:
            return os.path.isdir(self._p(name))
        return self.fs.isdir(self._fresh(self._p(name)))

    def size(self, name: str) -> int:
        if self.local:
            return os.path.getsize(self._p(name))
        return int(self.fs.size(self._fresh(self._p(name))))

    def read_bytes(self, name: str = "", *, on_retry: Callable[[], None] | None = None) -> bytes:
        """The whole object (one GET for S3), retried by the store's policy when remote.

        Raises FileNotFoundError when it does not exist, StoreUnreachable when the retry budget
        runs out (named by `name`, or by the root's URL for the root itself).
        """
        if self.local:
            with open(self._p(name), "rb") as f:
                return f.read()
        path = self._p(name)
        if self.retry is None:
            return self.fs.cat_file(path)
        return self.retry.call(lambda: self.fs.cat_file(path), name or self.url, self.url_of(name), on_retry)

    def open(self, name: str = "", *, block_size: int | None = None) -> IO[bytes]:
        """A binary file object for sequential reads (`block_size`: the read-ahead of a remote file)."""
        if self.local:
            return open(self._p(name), "rb")
        return self.fs.open(self._p(name), "rb", **({} if block_size is None else {"block_size": block_size}))

    def list(self, folder: str = "") -> list[str]:
        """Names of the entries directly in `folder` (relative to the root), sorted; [] when it does not exist."""
        try:
            if self.local:
                return sorted(os.listdir(self._p(folder)))
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self._fresh(self._p(folder)), detail=False))
        except FileNotFoundError:
            return []

    def sizes(self, folder: str = "") -> dict[str, int]:
        """{name: size in bytes} of the files directly in `folder` (one listing, no reads); {} when it
        does not exist. Sub-folders are left out."""
        try:
            if self.local:
                with os.scandir(self._p(folder)) as entries:
                    return {e.name: e.stat().st_size for e in entries if e.is_file()}
            listing = self.fs.ls(self._fresh(self._p(folder)), detail=True)
        except FileNotFoundError:
            return {}
        return {info["name"].rstrip("/").rsplit("/", 1)[-1]: int(info.get("size") or 0)
                for info in listing if info.get("type") == "file"}

    def find(self) -> list[tuple[str, int]]:
        """(name relative to the root, size in bytes) of every file under the root, at any depth, sorted."""
        if self.local:
            found = []
            for folder, _, files in os.walk(self.path):
                rel = os.path.relpath(folder, self.path)
                found += [(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"),
                           os.path.getsize(os.path.join(folder, f))) for f in files]
            return sorted(found)
        out = []
        for path, info in self.fs.find(self.path, detail=True).items():
            rel = path[len(self.path):].lstrip("/")
            if rel and info.get("type") == "file":
                out.append((rel, int(info.get("size") or 0)))
        return sorted(out)

    # ------------------------------------------------------------------ writing
    def create(self) -> None:
        """Make the root folder (the bucket too, for an object store) if it does not exist."""
        if self.local:
            os.makedirs(self.path, exist_ok=True)
        else:
            self.fs.makedirs(self.path, exist_ok=True)

    def write_bytes(self, name: str, data: bytes, fsync: bool = True) -> None:
        """Write a small file atomically (and durably unless fsync=False)."""
        if self.local:
            write_atomic(self._p(name), data, fsync=fsync)
        else:
            self.fs.pipe_file(self._p(name), data)

    def upload(self, local_file: str, name: str) -> None:
        """Copy the local file `local_file` to `name` (one upload, multipart for large files)."""
        if self.local:
            with open(local_file, "rb") as src:
                _write_atomic(self._p(name), lambda f: shutil.copyfileobj(src, f, 4 << 20), fsync=True)
        else:
            self.fs.put_file(local_file, self._p(name))

    def put_file(self, local_file: str, name: str, fsync: bool = True) -> None:
        """Move a finished local file to `name`: renamed (local; flushed to disk first unless
        fsync=False), or uploaded and then deleted (remote)."""
        if self.local:
            move_into_place(local_file, self._p(name), fsync=fsync)
        else:
            self.fs.put_file(local_file, self._p(name))
            os.remove(local_file)

    def remove(self, name: str) -> None:
        """Delete `name`; nothing happens when it does not exist."""
        try:
            if self.local:
                os.remove(self._p(name))
            else:
                self.fs.rm_file(self._p(name))
        except FileNotFoundError:
            pass
