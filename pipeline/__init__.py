"""Shards on storage -> masked batches on the device (NVIDIA DALI, or a plain PyTorch baseline).

`from lmim.pipeline import build_loader, Batch, DataError` is the public entry point. The names are
resolved lazily so that the format and storage modules below the loader (`lmim.pipeline.format`,
`lmim.pipeline.storage`, ...) can be imported without importing torch and the loader.
"""
from __future__ import annotations

# This folder is installed as lmim.pipeline (pyproject.toml); a bare `import pipeline` would load a second copy
# of every module (or a user's own pipeline/ folder), so it is refused.
if __name__ != "lmim.pipeline":
    raise ImportError(f"import lmim.pipeline, not {__name__}: lmim's packages live under the lmim namespace.")

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from lmim.pipeline.batch import Batch
    from lmim.pipeline.errors import DataError, SampleError, ShardError, StoreUnreachable
    from lmim.pipeline.loader import Loader, build_loader

_HOMES = {"Batch": "batch", "Loader": "loader", "build_loader": "loader", "DataError": "errors",
          "ShardError": "errors", "SampleError": "errors", "StoreUnreachable": "errors"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"lmim.pipeline.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
