"""Sample keys and member names: a sample is the tar members `{key}.{ext}` that share one key.

Readers (DALI's webdataset reader, webdataset's convention, `lmim verify`) take everything after
the first dot of a member's base name as its extension, and DALI's index separates fields with
spaces, so a key holds no dot and no space (`is_readable_key`). The builder's keys are stricter,
`[A-Za-z0-9_-]` only: a readable slug of the tail of the source path plus a short hash of the
whole path, readable in `tar tf`, unique in practice, and identical on every re-run (`make_key`).
"""
from __future__ import annotations

import hashlib
import re

# The extensions a sample's image may carry; DALI's webdataset reader takes them as alternatives.
IMAGE_EXTENSIONS = ("jpg", "png", "webp")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
SLUG_CHARS = 40  # keeps `{key}.json` far below the 100-byte ustar name limit
HASH_CHARS = 12


def member_name(key: str, ext: str) -> str:
    """The tar member name of a sample's component: `{key}.{ext}`."""
    return f"{key}.{ext}"


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name, split at the first dot of its base name.

    A folder part stays in the key (`a.b/c.d.e` -> (`a.b/c`, `d.e`)); a name without a dot is all key.
    """
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def is_readable_key(key: str) -> bool:
    """Whether readers can find a sample by this key: no dot in its base name, no space."""
    return "." not in key.rsplit("/", 1)[-1] and " " not in key


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
