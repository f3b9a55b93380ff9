"""Moved: the manifest is part of the on-disk format, `lmim.pipeline.format.manifest`.

These names stay importable from here only until the modules that still use this path
(tools/shard/build.py, cli.py, merge.py, state.py, tasks.py and tools/bench/quality.py) import
`lmim.pipeline.format.manifest`; then this file goes.
"""
from __future__ import annotations

from lmim.pipeline.format.manifest import MANIFEST_NAME, REJECTS_NAME, Manifest, ShardInfo, read_manifest

__all__ = ["MANIFEST_NAME", "REJECTS_NAME", "Manifest", "ShardInfo", "read_manifest"]
