"""What a shard build is asked to do: `BuildOptions`, checked in one place.

`lmim shard`'s flags and `build_dataset`'s keywords both become one `BuildOptions`; making one
checks every value that can be checked without touching SRC or DST, so a bad value fails before
anything is listed or written, with the one sentence the command line prints (it names the flag).
Two checks need the world and live where it is touched: `labels` (`sources.open_corpus`) and
everything about SRC and DST (`destination.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmim.tools.shard.errors import BuildError
from lmim.tools.shard.images import DEFAULT_MAX_PIXELS

__all__ = ["BuildOptions", "ImageOptions", "DEFAULT_PREFIX", "TOOL_VERSION"]

DEFAULT_PREFIX = "shard"
# Part of every plan's fingerprint: bump it when the same settings would write different shards,
# so that a build is never resumed across the change.
TOOL_VERSION = 1


@dataclass(frozen=True)
class ImageOptions:
    """How each image is checked and, when needed, re-encoded (`images.prepare_image`'s keywords)."""

    max_side: int | None = None
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    full_decode: bool = False


@dataclass(frozen=True)
class BuildOptions:
    """Every setting of a build; see `build_dataset` for what each one does."""

    shard_max_bytes: int | None = 256 << 20
    shard_max_samples: int | None = None
    workers: int = 2
    seed: int = 0
    part: tuple[int, int] | None = None
    max_side: int | None = None
    quality: int = 95
    full_decode: bool = False
    storage_options: dict[str, Any] | None = None
    progress: bool = True
    labels: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefix: str = DEFAULT_PREFIX
    source_storage_options: dict[str, Any] | None = None
    fsync: bool = True
    recheck: bool = False   # also read every finished shard in full and rebuild those that differ from their record

    def __post_init__(self) -> None:
        if self.shard_max_bytes is None and self.shard_max_samples is None:
            raise BuildError("give a shard size limit: --shard-max-bytes and/or --shard-max-samples")
        if any(limit is not None and limit <= 0 for limit in (self.shard_max_bytes, self.shard_max_samples)):
            raise BuildError("shard limits must be positive")
        if not 1 <= self.quality <= 100:
            raise BuildError(f"--quality must be between 1 and 100, not {self.quality}")
        if self.max_side is not None and self.max_side < 1:
            raise BuildError(f"--max-side must be a positive number of pixels, not {self.max_side}")
        if not self.prefix or any(c in self.prefix for c in "./ \t"):
            raise BuildError(f"--prefix {self.prefix!r} must be non-empty and hold no dot, slash or space")
        if self.part is not None:
            i, n = int(self.part[0]), int(self.part[1])
            if n < 1 or not 0 <= i < n:
                raise BuildError(f"--part {i}/{n} is out of range; use i/N with 0 <= i < N")
            object.__setattr__(self, "part", (i, n))  # frozen: normalise once, here

    @property
    def part_index(self) -> int:
        """i of `--part i/N` (0 for a whole build)."""
        return self.part[0] if self.part is not None else 0

    @property
    def part_count(self) -> int:
        """N of `--part i/N` (1 for a whole build)."""
        return self.part[1] if self.part is not None else 1

    @property
    def source_options(self) -> dict[str, Any] | None:
        """fsspec options for SRC: its own when given, else DST's (one set of credentials is the common case)."""
        return self.source_storage_options if self.source_storage_options is not None else self.storage_options

    @property
    def image(self) -> ImageOptions:
        return ImageOptions(max_side=self.max_side, quality=self.quality, max_pixels=self.max_pixels,
                            full_decode=self.full_decode)

    def content_settings(self) -> dict[str, Any]:
        """The settings besides seed and limits that change what the shards hold: they go into the plan's
        fingerprint and the manifest's build record (key order is part of those files' bytes)."""
        return {"max_side": self.max_side, "quality": self.quality, "full_decode": self.full_decode,
                "labels": self.labels, "max_pixels": self.max_pixels, "prefix": self.prefix, "version": TOOL_VERSION}
