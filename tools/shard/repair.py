"""Which finished shards a re-run of `lmim shard` rebuilds.

Pretraining, evaluation and `lmim verify` tell the user to run `lmim shard SRC DST` again when a
shard is missing or damaged, so a re-run on a complete dataset must not stop at its manifest. It
checks, with one listing and no reads, that every shard and index the manifest names is there and
every shard has its recorded size; with `--recheck` it also reads each shard in full (`lmim
verify`'s check) to find damage that keeps the size, such as a flipped byte. The build then
rebuilds only those shards: the plan is deterministic, so they come back byte-identical.
"""
from __future__ import annotations

from lmim.pipeline.format.manifest import ShardInfo
from lmim.pipeline.storage import Store
from lmim.tools.shard.destination import scrub_url
from lmim.tools.shard.errors import reach_error
from lmim.tools.shard.verify import shard_problems

__all__ = ["damaged_shards", "failing_recheck"]


def damaged_shards(dest: Store, shards: list[ShardInfo], classes: list[str] | None, *,
                   recheck: bool) -> list[str]:
    """Names of the shards in `shards` that are missing, of another size than recorded, without
    their index, or (with `recheck`) that fail `lmim verify`'s check; in the order given."""
    try:
        # one listing of the root: the builder writes every shard and index there (the prefix has no slash)
        listed = dest.sizes()
    except Exception as e:
        raise reach_error("DST", scrub_url(dest.url), e) from None
    damaged = [s.name for s in shards if listed.get(s.name) != s.bytes or s.index not in listed]
    if recheck:
        damaged += failing_recheck(dest, [s for s in shards if s.name not in damaged], classes)
    return damaged


def failing_recheck(dest: Store, shards: list[ShardInfo], classes: list[str] | None) -> list[str]:
    """Names of the shards among `shards` that `lmim verify` finds a problem in (each read in full)."""
    try:
        return [s.name for s in shards if shard_problems(dest, s, classes)]
    except Exception as e:
        raise reach_error("DST", scrub_url(dest.url), e) from None
