"""Shards on storage -> masked batches on the device (NVIDIA DALI, or a plain PyTorch baseline)."""
from pipeline.batch import Batch
from pipeline.errors import DataError, SampleError, ShardError, StoreUnreachable
from pipeline.loader import Loader, build_loader

__all__ = ["Batch", "Loader", "build_loader", "DataError", "ShardError", "SampleError", "StoreUnreachable"]
