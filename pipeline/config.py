"""Data configuration (the `data:` section of a training config).

This dataclass is the contract between `pipeline/` and `train/`: the trainer's structured
config embeds it, so fields may be added (with defaults) but not renamed. The image geometry
(grid, patch, gap) is taken from the model config by the trainer, not duplicated here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class DataConfig:
    url: str = "data/quickstart"           # dataset root: local path or fsspec URL (s3://bucket/prefix)
    eval_url: Optional[str] = None         # labelled split for k-NN monitoring / evaluation
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec override; AWS env vars by default

    loader: str = "dali"                   # "dali" | "torch" (webdataset + PIL baseline, no DALI needed)
    reader: str = "auto"                   # "auto" (local: DALI webdataset reader; remote: streaming) | "dali" | "stream"
    batch_size: int = 256                  # per process
    num_threads: int = 2                   # DALI CPU threads / DataLoader workers
    prefetch_shards: int = 2               # remote streaming: whole shards fetched ahead
    cache_dir: Optional[str] = None        # remote streaming: optional local shard cache
    cache_max_bytes: int = 0               # 0 = no cache kept beyond the prefetch window
    shuffle_buffer: int = 1024             # in-stream shuffle buffer (samples)
    on_error: str = "skip"                 # undecodable sample or unreadable shard: "skip" (name and count it) | "raise"
    verify_local: bool = True              # local shards: check each one's checksum once per process, before first use
    retry_budget_s: float = 600.0          # remote reads: keep retrying a failing shard this long (object stores throttle for minutes)
    max_retries: Optional[int] = None      # remote reads: also stop after this many retries (null: the time budget alone)

    # Augmentation (METHOD.md): RandomResizedCrop, bicubic, horizontal flip, ImageNet mean/std.
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    # Masks: "random" (exact count, the paper's), "block", "multiblock" (I-JEPA style).
    mask: str = "random"
    num_visible: int = 20                  # of grid*grid patches; every image gets exactly this many
    block_min_scale: float = 0.15          # block/multiblock: size range of one block (fraction of the grid)
    block_max_scale: float = 0.2
    block_aspect: tuple[float, float] = (0.75, 1.5)
    num_blocks: int = 4                    # multiblock: target blocks per image
