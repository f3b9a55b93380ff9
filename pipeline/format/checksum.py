"""Shard checksums: `"{algorithm}:{hex digest}"` strings, as the manifest records them.

New datasets use xxHash's XXH3-128. The checksum guards against corrupt or truncated transfers,
not against tampering (whoever can rewrite a shard can rewrite the manifest beside it), so a
cryptographic hash buys nothing here and costs a lot: SHA-256 runs at about 1 GB/s per core, so
hashing cost as much CPU as writing the shards at build time and as decoding a share of the
images when streaming readers verify every shard on every epoch; XXH3 runs at tens of GB/s.
Manifests written with SHA-256 (the first format) still verify.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Protocol

import xxhash

from lmim.pipeline.errors import ShardError

if TYPE_CHECKING:  # pragma: no cover
    from lmim.pipeline.format.manifest import ShardInfo

DEFAULT_ALGORITHM = "xxh3_128"
_ALGORITHMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
KNOWN_ALGORITHMS: tuple[str, ...] = tuple(_ALGORITHMS)


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> Hasher:
    try:
        return _ALGORITHMS[algorithm]()
    except KeyError:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; this lmim knows {', '.join(_ALGORITHMS)} "
                         "(a newer lmim may have written this dataset)") from None


def algorithm_of(checksum: str) -> str:
    """The algorithm part of a checksum string ("xxh3_128:ab12..." -> "xxh3_128")."""
    algorithm, sep, digest = checksum.partition(":")
    if not sep or not digest:
        raise ValueError(f"malformed checksum {checksum!r}: expected 'algorithm:hexdigest'")
    return algorithm


def format_checksum(hasher: Hasher, algorithm: str = DEFAULT_ALGORITHM) -> str:
    return f"{algorithm}:{hasher.hexdigest()}"


def checksum_of(data: bytes, algorithm: str = DEFAULT_ALGORITHM) -> str:
    h = new_hasher(algorithm)
    h.update(data)
    return format_checksum(h, algorithm)


def checksum_of_file(path: str, algorithm: str = DEFAULT_ALGORITHM, block: int = 4 << 20) -> str:
    h = new_hasher(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return format_checksum(h, algorithm)


def hasher_like(checksum: str) -> Hasher:
    """A fresh hasher of the algorithm `checksum` was made with (to check data against it)."""
    return new_hasher(algorithm_of(checksum))


def matches(data: bytes, checksum: str) -> bool:
    return checksum_of(data, algorithm_of(checksum)) == checksum


def verify_shard_checksum(info: "ShardInfo", digest: str) -> None:
    """The one integrity check, local and remote: `digest` (of the shard's bytes) must be the manifest's."""
    if digest != info.checksum:
        raise ShardError(info.name, f"checksum mismatch: {digest[:21]}..., the manifest says "
                                    f"{info.checksum[:21]}... (the shard changed or is corrupt; rebuild it "
                                    "with `lmim shard SRC DST --recheck`)")
