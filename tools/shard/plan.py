"""The build plan: which sample goes into which shard, as a pure function of the corpus listing.

Sorted source list -> seeded permutation -> shards cut greedily by the byte and sample limits,
where a sample's bytes are estimated from its source size plus tar/metadata overhead (exact for
pass-through images; re-encoded ones only get smaller, so the byte limit stays an upper bound
up to rare conversions). Because nothing here depends on what happened in an earlier run, a
re-run after a kill computes the same plan and knows which shards already exist; `--part i/N`
gives part i the shards n with n % N == i, so N parts together build exactly the one-part dataset.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from lmim.pipeline.format.keys import unique_keys
from lmim.tools.shard.sources import Corpus

# Three tar headers (image, json, cls) + padding + the json itself, per sample.
PER_SAMPLE_OVERHEAD = 3 * 512 + 512 + 256
UNKNOWN_SIZE_GUESS = 128 << 10  # remote file lists are not stat'ed: assume an ImageNet-sized JPEG


@dataclass
class Plan:
    shards: list[list[int]]   # item indices (into corpus.items) per shard, in stored order
    keys: list[str]           # per item
    fingerprint: str          # identifies (corpus listing, seed, limits, options)


def make_plan(corpus: Corpus, *, seed: int, shard_max_bytes: int | None, shard_max_samples: int | None,
              options: dict) -> Plan:
    """Shuffle the corpus with `seed` and cut it into shards.

    Args:
        corpus: the listing (items sorted by id).
        seed: shuffle seed.
        shard_max_bytes / shard_max_samples: limits (either may be None, not both).
        options: every other setting that changes shard contents (goes into the fingerprint).
    """
    items = corpus.items
    keys = unique_keys([it.id for it in items])
    order = np.random.default_rng(seed).permutation(len(items))
    shards: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in order.tolist():
        est = (items[i].size if items[i].size >= 0 else UNKNOWN_SIZE_GUESS) + PER_SAMPLE_OVERHEAD
        full = (shard_max_samples is not None and len(current) >= shard_max_samples) or \
               (shard_max_bytes is not None and current and size + est > shard_max_bytes)
        if full:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += est
    if current:
        shards.append(current)
    h = hashlib.sha256()
    h.update(json.dumps({"seed": seed, "shard_max_bytes": shard_max_bytes, "shard_max_samples": shard_max_samples,
                         "classes": corpus.classes, **options}, sort_keys=True).encode())
    for it in items:
        h.update(f"{it.id}\0{it.size}\0{it.label}\n".encode("utf-8", "surrogateescape"))
    return Plan(shards, keys, h.hexdigest()[:32])
