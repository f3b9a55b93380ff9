"""Collapse diagnostics of an encoder's features, and a picture of them.

- `collapse_cos`: the paper's diagnostic: the mean cosine similarity between the mean-pooled
  latents of DIFFERENT images (about 1.0 = collapsed: every image maps to the same direction;
  about 0.5 was seen with a momentum target). Computed exactly in O(N D) from
  |sum_i u_i|^2 = sum_ij u_i . u_j on unit vectors, so it uses every pair even for 50k images.
- `token_sim`: mean cosine between the different patch tokens of the SAME image, averaged over
  images (high = tokens carry no patch-specific information). The similarity regulariser's s, and
  the trainer's logged `*_token_sim`, count each token with itself too, as the reference does:
  s = 1/T + (1 - 1/T) x this, for T tokens (`lmim.model.losses.mean_token_similarity`).
- `effective_rank`: RankMe-style, exp(entropy) of the normalised singular values of the
  (uncentred) pooled features, `lmim.model.losses.effective_rank`, the same number the trainer logs
  (1 = a single direction; up to min(N, D)). A collapse that keeps the features apart but
  squeezes them into a few dimensions shows up here, not in `collapse_cos`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from lmim.model.losses import effective_rank, pairwise_cosine
from lmim.train.evaluate.figures import save_figure

def cross_image_cosine(pooled: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs (i != j) of rows of `pooled` [N, D]."""
    if pooled.shape[0] < 2:
        return float("nan")
    return float(pairwise_cosine(pooled.double().unsqueeze(0), include_self=False)[0])   # double: 50k x 50k pairs


def within_image_token_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """[B] mean pairwise cosine between the different tokens of each image; tokens [B, T, D], T >= 2."""
    return pairwise_cosine(tokens.float(), include_self=False)


def collapse_stats(feats: torch.Tensor, token_sim: torch.Tensor | None = None) -> dict[str, float]:
    """Collapse diagnostics.

    Args:
        feats: patch tokens [N, T, D] (pooled here by the mean over T, so pass patch tokens
            only, no CLS) or already mean-pooled features [N, D].
        token_sim: [N] per-image within-image token similarity, when the tokens themselves were
            not kept (see `features.extract`); ignored when `feats` is 3-D.

    Returns:
        dict with `collapse_cos`, `effective_rank`, `num_images`, `dim`, and `token_sim` when
        tokens (or `token_sim`) were given.
    """
    if feats.ndim == 3:
        if feats.shape[1] >= 2:
            token_sim = within_image_token_similarity(feats)
        pooled = feats.float().mean(1)
    elif feats.ndim == 2:
        pooled = feats.float()
    else:
        raise ValueError(f"collapse_stats takes [N, T, D] tokens or [N, D] pooled features, got {tuple(feats.shape)}.")
    out: dict[str, float] = {
        "collapse_cos": cross_image_cosine(pooled),
        "effective_rank": float(effective_rank(pooled)) if pooled.shape[0] >= 2 else float("nan"),
        "num_images": int(pooled.shape[0]),
        "dim": int(pooled.shape[1]),
    }
    if token_sim is not None and token_sim.numel():
        out["token_sim"] = float(token_sim.float().mean())
    return out


def pairwise_cosines(pooled: torch.Tensor, max_images: int = 2000, seed: int = 0) -> torch.Tensor:
    """Cosines of all pairs i < j among at most `max_images` rows (a fixed random subset)."""
    n = pooled.shape[0]
    if n > max_images:
        pooled = pooled[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images]]
    u = F.normalize(pooled.float(), dim=1)
    sim = u @ u.T
    i, j = torch.triu_indices(sim.shape[0], sim.shape[0], offset=1)
    return sim[i, j]


def plot_collapse(pooled: torch.Tensor, path: str | os.PathLike, title: str = "",
                  stats: dict | None = None) -> Path:
    """Write a PNG: histogram of cross-image cosines and the singular value spectrum.

    Args:
        pooled: [N, D] mean-pooled features (or [N, T, D] tokens, pooled here).
        path: output .png; written to a temporary file and renamed, so it is complete or absent.
        title: figure title (e.g. the checkpoint name).
        stats: `collapse_stats` output to print on the figure (computed when None).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    if pooled.ndim == 3:
        stats = stats or collapse_stats(pooled)
        pooled = pooled.float().mean(1)
    stats = stats or collapse_stats(pooled)
    cos = pairwise_cosines(pooled).numpy()
    sv = torch.linalg.svdvals(pooled.float())       # uncentred, as `effective_rank`
    sv = (sv / sv.sum().clamp_min(1e-12)).numpy()

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.hist(cos, bins=100, range=(-1, 1), color="tab:blue")
    a.axvline(stats["collapse_cos"], color="tab:red", ls="--", label=f"mean {stats['collapse_cos']:.3f}")
    a.set_xlabel("cosine between mean-pooled latents of different images")
    a.set_ylabel("pairs")
    a.legend()
    b.semilogy(range(1, len(sv) + 1), sv, marker=".", ms=3)
    b.set_xlabel("singular value index")
    b.set_ylabel("normalised singular value")
    b.set_title(f"effective rank {stats['effective_rank']:.1f} of {stats['dim']}")
    sup = title or "collapse diagnostics"
    if "token_sim" in stats:
        sup += f"  (within-image token cosine {stats['token_sim']:.3f})"
    fig.suptitle(sup)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
