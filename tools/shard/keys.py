"""Sample keys: unique, dot-free, deterministic functions of the source path.

DALI's webdataset reader takes everything after the first dot of a member's base name as its
extension, and its index format separates fields with spaces, so a key may hold only
`[A-Za-z0-9_-]`. A key is a readable slug of the tail of the source path plus a short hash of the
whole path: readable in `tar tf`, unique in practice, and identical on every re-run.
"""
from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
SLUG_CHARS = 40  # keeps `{key}.json` far below the 100-byte ustar name limit
HASH_CHARS = 12


def path_hash(source_id: str, chars: int = HASH_CHARS) -> str:
    return hashlib.blake2b(source_id.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()[:chars]


def make_key(source_id: str, hash_chars: int = HASH_CHARS) -> str:
    """The key of the sample made from `source_id` (a path relative to the corpus root).

    Args:
        source_id: the sample's source path, as recorded in its `.json`.
        hash_chars: hex digits of the path hash (raised only to resolve a collision).
    """
    stem = source_id.rsplit(".", 1)[0] if "." in source_id.rsplit("/", 1)[-1] else source_id
    slug = _UNSAFE.sub("_", stem).strip("_-")[-SLUG_CHARS:].strip("_-")
    digest = path_hash(source_id, hash_chars)
    return f"{slug}-{digest}" if slug else digest


def unique_keys(source_ids: list[str]) -> list[str]:
    """Keys for `source_ids` (distinct), lengthening the hash deterministically on a collision."""
    keys = [make_key(s) for s in source_ids]
    if len(set(keys)) == len(keys):
        return keys
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        seen.setdefault(k, 0)
        seen[k] += 1
    for i, s in enumerate(source_ids):
        if seen[keys[i]] > 1:
            keys[i] = make_key(s, hash_chars=32)
    if len(set(keys)) != len(keys):  # only if two distinct paths share 128 bits of hash
        raise ValueError("could not make unique sample keys (duplicate source paths?)")
    return keys
