"""Errors the pipeline raises: each names the shard (and the sample key when there is one)."""
from __future__ import annotations


class DataError(RuntimeError):
    """Base class: the dataset cannot be read as promised."""


class ShardError(DataError):
    """A whole shard is unusable: missing, truncated, a bad index, a checksum mismatch, a network error."""

    def __init__(self, shard: str, message: str):
        super().__init__(f"shard {shard}: {message}")
        self.shard = shard


class SampleError(DataError):
    """One sample cannot be decoded (raised when `on_error="raise"`)."""

    def __init__(self, shard: str, key: str, message: str):
        super().__init__(f"sample {key!r} in shard {shard}: {message}")
        self.shard = shard
        self.key = key
