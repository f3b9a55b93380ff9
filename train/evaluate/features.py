"""Frozen features of a dataset through a timm VisionTransformer, on one or many processes.

Each process runs the encoder over its own part of the evaluation loader (the pipeline's eval mode
gives every rank a disjoint part, whose size may differ per rank); the parts are then gathered to
every process (pad to the largest part, all_gather, trim), deduplicated by sample key (a loader
may repeat a few samples to even out the ranks) and sorted by key, so the result is the same
whatever the number of processes.

Pools (the paper and its reference code): "mean_patch" = mean of the patch tokens after the final norm, CLS excluded
(the paper's nearest-neighbour protocol); "cls" = the CLS token.
"""
from __future__ import annotations

import sys
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from lmim.train.evaluate.collapse import within_image_token_similarity

POOLS = ("mean_patch", "cls")


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a [n_r, ...] CPU tensor from every rank (rank order); n_r may differ per rank."""
    if not _dist_ready():
        return t
    dev = _comm_device()
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


def gather_objects(items: list) -> list:
    """Concatenate a Python list from every rank (rank order)."""
    if not _dist_ready():
        return items
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """(images, labels, keys) from a pipeline `Batch` or an (images, labels) pair."""
    if hasattr(batch, "images"):
        return batch.images, batch.labels, batch.keys
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1], None
    raise TypeError(f"the loader must yield pipeline.Batch or (images, labels) pairs, got {type(batch).__name__}.")


@torch.no_grad()
def extract(
    encoder: torch.nn.Module,
    loader: Iterable,
    device: torch.device | str | None = None,
    pools: Sequence[str] = ("mean_patch",),
    token_sim: bool = False,
    progress: bool = False,
) -> dict:
    """Features of every sample of `loader` (all processes' parts together).

    Args:
        encoder: a timm VisionTransformer (anything with `forward_features` -> [B, prefix + N, D]
            and `num_prefix_tokens`).
        loader: iterable of `pipeline.Batch` (eval mode) or (images, labels) pairs.
        device: where the encoder runs (default: the device of its parameters).
        pools: any of "mean_patch", "cls".
        token_sim: also return each image's within-image patch-token cosine similarity.
        progress: show a tqdm bar (rank 0).

    Returns:
        dict: one [N, D] float32 CPU tensor per pool, `labels` [N] int64 (-1 where unlabelled),
        `keys` (list of N keys, or None when the loader gives none), and `token_sim` [N] if asked.
    """
    for p in pools:
        if p not in POOLS:
            raise ValueError(f"unknown pool {p!r}; choose from {', '.join(POOLS)}.")
    param = next(encoder.parameters())
    dev = torch.device(device) if device is not None else param.device
    was_training = encoder.training
    encoder.eval().to(dev)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))

    feats: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
    labels: list[torch.Tensor] = []
    sims: list[torch.Tensor] = []
    keys: list[str] | None = []
    it = loader
    if progress and (not _dist_ready() or dist.get_rank() == 0):
        from tqdm.auto import tqdm

        # In a log file (stderr not a terminal) a redraw every 0.1 s would be a line each; 30 s is plenty.
        it = tqdm(loader, desc="features", unit="batch", mininterval=0.1 if sys.stderr.isatty() else 30.0)
    for batch in it:
        images, lab, bkeys = _unpack(batch)
        tokens = encoder.forward_features(images.to(dev, param.dtype, non_blocking=True))
        patches = tokens[:, prefix:]
        if "mean_patch" in feats:
            feats["mean_patch"].append(patches.float().mean(1).cpu())
        if "cls" in feats:
            feats["cls"].append(tokens[:, 0].float().cpu())
        if token_sim:
            sims.append(within_image_token_similarity(patches).cpu())
        b = tokens.shape[0]
        labels.append(torch.full((b,), -1, dtype=torch.long) if lab is None else lab.detach().long().cpu().view(b))
        if keys is not None and bkeys is not None and len(bkeys) == b:
            keys.extend(str(k) for k in bkeys)
        else:
            keys = None  # one batch without keys: no deduplication possible
    encoder.train(was_training)

    dim = int(getattr(encoder, "embed_dim", 0) or getattr(encoder, "num_features", 0))
    out: dict = {}
    for p, parts in feats.items():
        local = torch.cat(parts) if parts else torch.zeros((0, dim))
        out[p] = gather_rows(local.float())
    out["labels"] = gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    if token_sim:
        out["token_sim"] = gather_rows(torch.cat(sims) if sims else torch.zeros(0))
    # Keys: a rank with no keys makes the whole set keyless (every rank must agree).
    have_keys = torch.tensor([0 if keys is None else 1])
    if _dist_ready():
        flags = gather_rows(have_keys)
        have_keys = flags.min().view(1)
    if int(have_keys) and keys is not None:
        all_keys = gather_objects(keys)
        first: dict[str, int] = {}
        for i, k in enumerate(all_keys):
            first.setdefault(k, i)
        order = sorted(first)                              # by key: independent of the world size
        index = torch.tensor([first[k] for k in order], dtype=torch.long)
        for name in [*feats, "labels", *(["token_sim"] if token_sim else [])]:
            out[name] = out[name][index]
        out["keys"] = order
    else:
        if _dist_ready():
            gather_objects([])  # keep the collective calls matched on every rank
        out["keys"] = None
    return out


def extract_features(
    encoder: torch.nn.Module,
    loader: Iterable,
    device: torch.device | str | None = None,
    pool: str = "mean_patch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 CPU, labels [N] int64) of every sample in `loader`.

    Gathers across processes when torch.distributed is initialised (every rank gets the whole
    set), deduplicated and sorted by sample key when the loader gives keys.

    Args:
        encoder: a timm VisionTransformer.
        loader: a `pipeline` eval loader (yields `Batch` with `images`, `labels`, `keys`).
        device: where the encoder runs (default: where its parameters are).
        pool: "mean_patch" (mean of patch tokens, CLS excluded: the paper's NN protocol) or "cls".
    """
    out = extract(encoder, loader, device, pools=(pool,))
    return out[pool], out["labels"]


# ----------------------------------------------------------------------------- datasets
def encoder_geometry(encoder: torch.nn.Module) -> tuple[int, int]:
    """(grid_size, patch_size) of a timm ViT: evaluation images are grid * patch px, no gap."""
    pe = getattr(encoder, "patch_embed", None)
    if pe is None or getattr(pe, "grid_size", None) is None:
        raise ValueError("the encoder has no timm patch_embed with a fixed grid; pass a timm VisionTransformer.")
    grid, patch = pe.grid_size, pe.patch_size
    if grid[0] != grid[1] or patch[0] != patch[1]:
        raise ValueError(f"only square grids and patches are supported, got grid {grid} and patch {patch}.")
    return int(grid[0]), int(patch[0])


def dist_place() -> tuple[int, int]:
    """(rank, world_size) of this process (0, 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def eval_loader(encoder: torch.nn.Module, url: str, data_cfg=None, *, batch_size: int | None = None,
                loader: str | None = None, device: torch.device | str | None = None):
    """The `pipeline` evaluation loader of `url` for this process, in the encoder's geometry.

    Resize + centre crop to grid * patch px, no patch gap, no masks, one ordered pass; each rank
    reads a disjoint part (torch.distributed's rank/world size when initialised).

    Args:
        data_cfg: a `lmim.pipeline.config.DataConfig` (normalisation, threads, storage options);
            the default one when None.
        batch_size, loader: override `data_cfg.batch_size` / `data_cfg.loader` ("dali" | "torch").
        device: where batches are produced (DALI decodes on "cuda:N").
    """
    import dataclasses

    from lmim.pipeline import build_loader
    from lmim.pipeline.config import DataConfig

    cfg = data_cfg if data_cfg is not None else DataConfig()
    changes = {"url": url}
    if batch_size is not None:
        changes["batch_size"] = int(batch_size)
    if loader is not None:
        changes["loader"] = loader
    cfg = dataclasses.replace(cfg, **changes)
    grid, patch = encoder_geometry(encoder)
    rank, world = dist_place()
    return build_loader(cfg, grid_size=grid, patch_size=patch, patch_gap=0, train=False, rank=rank,
                        world_size=world, device=device, seed=0, url=url)
