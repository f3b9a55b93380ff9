"""Writing one shard: a tar with its DALI index computed while writing, then an atomic move/upload.

The tar is written by hand (ustar headers from `tarfile.TarInfo.tobuf`, data, padding) because
that gives each member's data offset for free: the DALI index (`v1.2 N`, then per sample
`ext offset size name` per component, as DALI's `wds2idx` writes it) needs no second pass over
the tar. Headers carry fixed metadata (mtime 0, uid/gid 0, mode 644), so a shard's bytes, and
therefore its checksum, depend only on its samples: a resumed build is byte-identical to an
uninterrupted one.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from typing import Any

BLOCK = 512
INDEX_VERSION = "v1.2"


@dataclass
class ShardResult:
    samples: int
    bytes: int
    sha256: str
    index_text: str


class TarShardWriter:
    """Append samples to a local tar file, hashing and indexing as it goes.

    Args:
        path: local file to write (a temporary name; the caller moves it into place).
    """

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "wb")
        self._sha = hashlib.sha256()
        self._pos = 0
        self._lines: list[str] = []

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Write one sample: `members` is [(ext, data), ...] stored as `{key}.{ext}` in this order."""
        parts = []
        for ext, data in members:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            parts.append(f"{ext} {self._pos} {len(data)} {name}")
            self._write(data)
            pad = -len(data) % BLOCK
            if pad:
                self._write(b"\0" * pad)
        self._lines.append(" ".join(parts))

    @property
    def samples(self) -> int:
        return len(self._lines)

    def close(self) -> ShardResult:
        self._write(b"\0" * (2 * BLOCK))  # end-of-archive marker
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        index = f"{INDEX_VERSION} {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines)
        return ShardResult(len(self._lines), self._pos, self._sha.hexdigest(), index)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        try:
            os.remove(self.path)
        except OSError:
            pass


def sha256_file(path: str, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Destination:
    """The dataset root (local folder or fsspec URL) with atomic writes.

    Local: write to a temporary name in the same folder, then `os.replace` (atomic on POSIX).
    Object stores: a PUT (single or multipart) only becomes visible when complete, so uploading
    the finished local temporary file is atomic too.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        import fsspec

        self.url = root.rstrip("/") or root
        self.local = "://" not in root or root.startswith("file://")
        self.storage_options = dict(storage_options or {})
        if self.local:
            self.fs = None
            self.path = os.path.abspath(root[len("file://"):] if root.startswith("file://") else root)
        else:
            self.fs, self.path = fsspec.core.url_to_fs(root, **self.storage_options)
            self.path = self.path.rstrip("/")

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name) if self.local else f"{self.path}/{name}"

    def url_of(self, name: str) -> str:
        return self._p(name) if self.local else f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        if self.local:
            return os.path.exists(self._p(name))
        return self.fs.exists(self._p(name))

    def size(self, name: str) -> int:
        if self.local:
            return os.path.getsize(self._p(name))
        return int(self.fs.size(self._p(name)))

    def read_bytes(self, name: str) -> bytes:
        if self.local:
            with open(self._p(name), "rb") as f:
                return f.read()
        return self.fs.cat_file(self._p(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file atomically."""
        if self.local:
            path = self._p(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(self._p(name), data)

    def put_file(self, local_path: str, name: str) -> None:
        """Move (local) or upload (remote) a finished local file to `name`."""
        if self.local:
            os.replace(local_path, self._p(name))
        else:
            self.fs.put_file(local_path, self._p(name))
            os.remove(local_path)

    def list(self, folder: str) -> list[str]:
        """Names of files directly in `folder` (relative to the root); [] when it does not exist."""
        try:
            if self.local:
                return sorted(os.listdir(self._p(folder)))
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self._p(folder), detail=False))
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        try:
            if self.local:
                os.remove(self._p(name))
            else:
                self.fs.rm_file(self._p(name))
        except FileNotFoundError:
            pass
