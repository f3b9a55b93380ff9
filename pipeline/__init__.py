"""Shards on storage -> masked batches on the device (NVIDIA DALI, or a plain PyTorch baseline)."""
# This folder is installed as lmim.pipeline (pyproject.toml); a bare `import pipeline` would load a second copy
# of every module (or a user's own pipeline/ folder), so it is refused.
if __name__ != "lmim.pipeline":
    raise ImportError(f"import lmim.pipeline, not {__name__}: lmim's packages live under the lmim namespace.")
from lmim.pipeline.batch import Batch
from lmim.pipeline.errors import DataError, SampleError, ShardError, StoreUnreachable
from lmim.pipeline.loader import Loader, build_loader

__all__ = ["Batch", "Loader", "build_loader", "DataError", "ShardError", "SampleError", "StoreUnreachable"]
