"""Shards on storage -> masked batches on the device (NVIDIA DALI)."""
from pipeline.batch import Batch

__all__ = ["Batch"]
