"""Writing one shard: a tar with its DALI index computed while writing (moved or uploaded into
place by `lmim.pipeline.storage.Store.put_file`).

The tar is written by hand (ustar headers from `tarfile.TarInfo.tobuf`, data, padding) because
that gives each member's data offset for free: the DALI index (`lmim.pipeline.format.index`)
needs no second pass over the tar. Headers carry fixed metadata (mtime 0, uid/gid 0, mode 644), so a shard's bytes, and
therefore its checksum, depend only on its samples: a resumed build is byte-identical to an
uninterrupted one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from lmim.pipeline.format.checksum import format_checksum, new_hasher
from lmim.pipeline.format.index import component, index_text
from lmim.pipeline.format.keys import member_name

BLOCK = 512

# A ustar header is constant except for the name, size and checksum, so it is assembled from a
# template (tarfile.TarInfo.tobuf costs ~60 us a member, a third of a sample's whole budget).
# Fields: mode 644, uid/gid 0, mtime 0, regular file, magic "ustar\0" version "00", no owner names.
_HEAD_MID = b"0000644\x00" + b"0000000\x00" * 2            # mode, uid, gid (offset 100)
_HEAD_MTIME = b"00000000000\x00"                             # offset 136
_HEAD_TAIL = (b"0" + b"\x00" * 100 + b"ustar\x00" + b"00" + b"\x00" * 64 + b"\x00" * 16
              + b"\x00" * 167)                                # typeflag .. end (offset 156)
_CHKSUM_CONST = sum(_HEAD_MID) + sum(_HEAD_MTIME) + sum(_HEAD_TAIL) + 8 * 32


def tar_header(name: bytes, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for a regular file `name` of `size` bytes with the
    metadata above (checked against `tarfile.TarInfo.tobuf` in the tests)."""
    if len(name) > 100:
        raise ValueError(f"member name longer than 100 bytes: {name!r}")
    if size >= 8 ** 11:
        raise ValueError(f"member of {size} bytes is too large for a ustar header")
    size_field = b"%011o\x00" % size
    chksum = _CHKSUM_CONST + sum(name) + sum(size_field)
    return b"".join((name.ljust(100, b"\x00"), _HEAD_MID, size_field, _HEAD_MTIME, b"%06o\x00 " % chksum, _HEAD_TAIL))


@dataclass
class ShardResult:
    samples: int
    bytes: int
    checksum: str   # "xxh3_128:<hex>" (lmim.pipeline.format.checksum)
    index_text: str


class TarShardWriter:
    """Append samples to a local tar file, hashing and indexing as it goes.

    Args:
        path: local file to write (a temporary name; the caller moves it into place).
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._sha = new_hasher()
        self._pos = 0
        self._lines: list[str] = []

    def _write(self, data: bytes) -> None:
        self._writev([data])

    def _writev(self, chunks: list[bytes]) -> None:
        # one gather-write per sample: no copy of the image into a joined buffer
        total = sum(len(c) for c in chunks)
        done = os.writev(self._fd, chunks)
        while done < total:  # short write (rare): finish the rest from where it stopped
            rest = b"".join(chunks)[done:]
            done += os.write(self._fd, rest)
        for c in chunks:
            self._sha.update(c)
        self._pos += total

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Write one sample: `members` is [(ext, data), ...] stored as `{key}.{ext}` in this order."""
        parts = []
        chunks = []
        pos = self._pos
        for ext, data in members:
            name = member_name(key, ext)
            size = len(data)
            chunks.append(tar_header(name.encode("ascii"), size))
            pos += BLOCK
            parts.append(component(ext, pos, size, name))
            chunks.append(data)
            pad = -size % BLOCK
            if pad:
                chunks.append(b"\0" * pad)
            pos += size + pad
        self._writev(chunks)
        assert self._pos == pos
        self._lines.append(" ".join(parts))

    @property
    def samples(self) -> int:
        return len(self._lines)

    def close(self) -> ShardResult:
        self._write(b"\0" * (2 * BLOCK))  # end-of-archive marker
        os.close(self._fd)
        self._fd = -1
        return ShardResult(len(self._lines), self._pos, format_checksum(self._sha), index_text(self._lines))

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.remove(self.path)
        except OSError:
            pass

