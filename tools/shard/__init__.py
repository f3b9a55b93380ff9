"""Shard building: raw image corpora -> WebDataset shards + DALI indices + manifest (local or s3://).

Public API:
    build_dataset(src, dst, options=None, **keywords) -> BuildSummary   build or finish a dataset
        (see lmim.tools.shard.build; `options` is a BuildOptions, keywords override its fields)
    merge_parts(dst, storage_options=None) -> Manifest write the manifest of a --part i/N build
    verify_dataset(root, storage_options=None) -> list[str]   problems found ([] when sound)
"""
from lmim.tools.shard.build import BuildSummary, build_dataset
from lmim.tools.shard.config import BuildOptions
from lmim.tools.shard.errors import BuildError
from lmim.tools.shard.merge import merge_parts

__all__ = ["BuildError", "BuildOptions", "BuildSummary", "build_dataset", "merge_parts", "verify_dataset"]


def verify_dataset(root: str, storage_options: dict | None = None) -> list[str]:
    """Check a dataset against its manifest; returns one line per problem, naming the shard."""
    from lmim.tools.shard.verify import verify_dataset as _verify

    return _verify(root, storage_options)
