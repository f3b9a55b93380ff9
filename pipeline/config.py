"""Data configuration (the `data:` section of a training config).

This dataclass is the contract between `pipeline/` and `train/`: the trainer's structured
config embeds it, so fields may be added (with defaults) but not renamed. The image geometry
(grid, patch, gap) is taken from the model config by the trainer, not duplicated here.
`check_data_config` is the one place its values are validated: the trainer's config loader
calls it at load time (so a bad value fails before anything runs) and so does `build_loader`
for callers that build a loader from Python.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from lmim.pipeline.storage import is_remote

# The accepted values of each choice key (the trainer adds its own loaders, e.g. "synthetic").
DATA_CHOICES: dict[str, tuple[str, ...]] = {
    "loader": ("dali", "torch"),
    "reader": ("auto", "dali", "stream"),
    "on_error": ("skip", "raise"),
    "mask": ("random", "block", "multiblock"),
}
# Keys that configs once accepted and lmim no longer reads, with what to do instead.
REMOVED_DATA_KEYS: dict[str, str] = {
    "shuffle_buffer": "samples are shuffled by the deterministic global order of lmim/pipeline/order.py, so "
                      "there is no in-stream buffer to size",
}


@dataclass
class SourceConfig:
    """One data set of a weighted mixture (`data.sources`)."""

    url: str = "???"                       # a dataset built by `lmim shard`: local path or fsspec URL
    weight: float = 1.0                    # relative share of each epoch's samples (any positive scale)
    name: Optional[str] = None             # in logs and metrics; default: the URL's last path component


@dataclass
class DataConfig:
    url: str = "data/quickstart"           # dataset root: local path or fsspec URL (s3://bucket/prefix)
    # Weighted mixture of several datasets (pipeline/mix.py); when given, it replaces `url` for training.
    sources: list[SourceConfig] = field(default_factory=list)
    samples_per_epoch: Optional[int] = None  # one epoch of training: null = every sample of the dataset(s) once
    eval_url: Optional[str] = None         # labelled split for k-NN monitoring / evaluation
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec override; AWS env vars by default

    loader: str = "dali"                   # "dali" | "torch" (webdataset + PIL baseline, no DALI needed)
    reader: str = "auto"                   # "auto" (local: DALI webdataset reader; remote: streaming) | "dali" | "stream"
    batch_size: int = 256                  # per process
    num_threads: int = 2                   # DALI CPU threads / DataLoader workers
    prefetch_shards: int = 2               # remote streaming: whole shards fetched ahead
    cache_dir: Optional[str] = None        # remote streaming: optional local shard cache
    cache_max_bytes: int = 0               # 0 = no cache kept beyond the prefetch window
    on_error: str = "skip"                 # undecodable sample or unreadable shard: "skip" (name and count it) | "raise"
    verify_local: bool = True              # local shards: check each one's checksum once per process, before first use
    retry_budget_s: float = 600.0          # remote reads: keep retrying a failing shard this long (object stores throttle for minutes)
    max_retries: Optional[int] = None      # remote reads: also stop after this many retries (null: the time budget alone)

    # Augmentation (the paper and its reference code): RandomResizedCrop, bicubic, horizontal flip, ImageNet mean/std.
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


class DataConfigError(ValueError):
    """A bad `data.*` value, phrased as one sentence that names the key."""


def check_data_config(cfg: Any, extra_loaders: tuple[str, ...] = ()) -> None:
    """Validate a `DataConfig` (or the `data:` section of a training config).

    Args:
        cfg: anything with DataConfig's attributes.
        extra_loaders: loader names the caller handles itself (the trainer's "synthetic").

    Raises:
        DataConfigError: the first bad value, in one sentence naming `data.<key>`.
    """
    choices = dict(DATA_CHOICES, loader=DATA_CHOICES["loader"] + tuple(extra_loaders))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise DataConfigError(f"Config key 'data.{key}' must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}.")

    def fail(key: str, rule: str) -> None:
        raise DataConfigError(f"Config key 'data.{key}' must be {rule}, got {getattr(cfg, key)!r}.")

    for key in ("batch_size", "num_threads", "prefetch_shards", "num_visible", "num_blocks"):
        if getattr(cfg, key) < 1:
            fail(key, "at least 1")
    if cfg.cache_max_bytes < 0:
        fail("cache_max_bytes", "0 (keep nothing beyond the prefetch window) or a positive number of bytes")
    if cfg.cache_dir:
        _check_cache_dir(str(cfg.cache_dir))
    if not math.isfinite(cfg.retry_budget_s) or cfg.retry_budget_s < 0:
        fail("retry_budget_s", "a finite number of seconds >= 0")
    if cfg.max_retries is not None and cfg.max_retries < 0:
        fail("max_retries", ">= 0 or null (the time budget alone)")
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        fail("crop_scale", "a range [lo, hi] with 0 < lo <= hi <= 1 (fractions of the image area)")
    lo, hi = cfg.crop_ratio
    if not 0 < lo <= hi:
        fail("crop_ratio", "a range [lo, hi] of aspect ratios with 0 < lo <= hi")
    if not 0 <= cfg.hflip <= 1:
        fail("hflip", "a probability between 0 and 1")
    if len(cfg.std) != 3 or not all(0 < s < math.inf for s in cfg.std):  # NaN is refused too
        fail("std", "three positive numbers")
    if not 0 < cfg.block_min_scale <= cfg.block_max_scale <= 1:
        fail("block_min_scale", f"in (0, data.block_max_scale={cfg.block_max_scale}] and at most 1")
    lo, hi = cfg.block_aspect
    if not 0 < lo <= hi:
        fail("block_aspect", "a range [lo, hi] of aspect ratios with 0 < lo <= hi")
    if cfg.samples_per_epoch is not None and cfg.samples_per_epoch < 1:
        fail("samples_per_epoch", "a positive number of samples or null (every sample of the data once)")
    for source in training_sources(cfg):
        check_reader(cfg.reader, source.url)


@dataclass(frozen=True)
class Source:
    """A training data set, resolved: where, how much of each epoch, and what the logs call it."""

    url: str
    weight: float
    name: str


def training_sources(cfg: Any) -> list[Source]:
    """`data.sources` (validated, named uniquely), or `data.url` as the one source of weight 1.

    Entries may be `SourceConfig`s, mappings (from Python) or an OmegaConf config's nodes.

    Raises:
        DataConfigError: an entry without a URL, an unknown key, or a weight that is not positive.
    """
    entries = list(getattr(cfg, "sources", None) or [])
    if not entries:
        return [Source(str(cfg.url), 1.0, _default_name(str(cfg.url)))]
    out: list[Source] = []
    explicit: list[bool] = []
    for n, entry in enumerate(entries):
        if isinstance(entry, Mapping):  # a dict from Python, or an OmegaConf node
            get = entry.get
            unknown = sorted(set(map(str, entry)) - {"url", "weight", "name"})
        else:
            get, unknown = (lambda key, default=None, e=entry: getattr(e, key, default)), []
        if unknown:
            raise DataConfigError(f"Config key 'data.sources[{n}]' has unknown key(s) {', '.join(unknown)}; "
                                  "an entry is {url, weight, name}.")
        url, weight, name = get("url"), get("weight", 1.0), get("name")
        if not url or url == "???":
            raise DataConfigError(f"Config key 'data.sources[{n}].url' must be a dataset URL or path, got {url!r}.")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            weight = float("nan")
        if not math.isfinite(weight) or weight <= 0:
            raise DataConfigError(f"Config key 'data.sources[{n}].weight' must be a positive number, "
                                  f"got {get('weight', 1.0)!r}.")
        out.append(Source(str(url), weight, str(name) if name else _default_name(str(url))))
        explicit.append(bool(name))
    names = [s.name for s in out]
    for n, (source, given) in enumerate(zip(out, explicit)):
        # a name the user chose keys the per-source counts of the logs and checkpoints: it must be one source's
        if given and names.count(source.name) > 1:
            other = next(i for i, name in enumerate(names) if name == source.name and i != n)
            raise DataConfigError(f"Config key 'data.sources[{n}].name' is {source.name!r}, the name of "
                                  f"data.sources[{other}] too; give each source its own name.")
    return [Source(s.url, s.weight, s.name if names.count(s.name) == 1 else f"{s.name}#{i}")
            for i, s in enumerate(out)]


def _default_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1] or url


def check_reader(reader: str, url: str) -> None:
    """DALI's own reader opens local files only; a remote data set is streamed."""
    if reader == "dali" and is_remote(url):
        raise DataConfigError(f"Config key 'data.reader' is 'dali', which reads local shards only, but {url} is "
                              "remote; use data.reader=stream (or auto).")


def _check_cache_dir(path: str) -> None:
    """data.cache_dir is created when the first shard is cached, deep in a run: check now that it can be
    (a folder, or a path whose nearest existing parent is a writable folder)."""
    from lmim.pipeline.storage import folder_obstacle, has_scheme

    if has_scheme(path):
        raise DataConfigError(f"Config key 'data.cache_dir' is a URL ({path}); the shard cache is a local folder: "
                              "point it at a local disk.")
    obstacle = folder_obstacle(path)
    if obstacle is None:
        return
    kind, probe = obstacle
    if kind == "file":
        what = "is a file" if probe == os.path.abspath(path) else f"lies under the file {probe}"
        raise DataConfigError(f"Config key 'data.cache_dir' {path!r} {what}: point it at a folder.")
    raise DataConfigError(f"Config key 'data.cache_dir' {path!r} cannot be written (no write permission on "
                          f"{probe}): point it at a folder you can write.")
