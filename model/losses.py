"""Objectives and diagnostics of Latent MIM (the paper and its reference code), computed in float32.

All losses are per image: nothing crosses the batch, so they do not depend on the batch size or
on the number of processes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_infonce(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """Patch InfoNCE: each predicted patch must match its own target among the image's targets.

    Predictions are standardised per image and channel across the target patches
    ((p - mean) / (std + 1e-4), unbiased std as torch's default), both sides are L2-normalised,
    logits = p . t / tau per image ([T, T]), cross-entropy with the diagonal as positives,
    multiplied by 2 tau.

    Args:
        pred: [B, T, C] predictions.
        target: [B, T, C] target latents.
        tau: temperature.

    Returns:
        Scalar loss (mean over images and patches).
    """
    p = pred.float()
    t = target.float()
    # Two passes (mean, then the centred squares) instead of torch.std over dim 1: the same unbiased
    # std, but std's strided reduction cost 5.5 of 6.6 ms of this forward on a 2-core CPU ([128, 57, 192]).
    d = p - p.mean(1, keepdim=True)
    p = d / ((d.square().sum(1, keepdim=True) / (p.shape[1] - 1)).sqrt() + 1e-4)
    p = F.normalize(p, dim=-1)
    t = F.normalize(t, dim=-1)
    logits = torch.bmm(p, t.transpose(1, 2)) / tau                      # [B, T, T]
    b, n = logits.shape[:2]
    labels = torch.arange(n, device=logits.device).expand(b, n)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten()) * (2 * tau)


def norm_l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The MSE ablation: standardise each target token over its channels, regress with MSE."""
    t = target.float()
    t = F.layer_norm(t, t.shape[-1:], eps=1e-6)
    return F.mse_loss(pred.float(), t)


def pairwise_cosine(x: torch.Tensor, include_self: bool) -> torch.Tensor:
    """[B] mean cosine over the pairs of the T vectors of each x[b] (x [B, T, C], in x's dtype): all
    T x T ordered pairs (include_self) or the T (T - 1) pairs of different vectors (T >= 2). The
    regulariser's s, the trainer's diagnostics and `lmim eval collapse` all use it.

    Uses |sum_i u_i|^2 = sum_ij u_i . u_j on unit vectors, so it costs O(T C), not O(T^2 C).
    """
    u = F.normalize(x, dim=-1)
    t = u.shape[1]
    total = u.sum(1).pow(2).sum(-1)                                      # sum over all ordered pairs incl. i == j
    return total / (t * t) if include_self else (total - t) / (t * (t - 1))


def mean_token_similarity(x: torch.Tensor) -> torch.Tensor:
    """s(x) of the similarity regulariser: the mean cosine over all T x T pairs of an image's tokens,
    each token with itself included, averaged over the batch.

    The reference implementation computes s this way (`avg_pairwise_sim`: the mean of the full
    cosine matrix), and the s* schedule (0.75 -> 0.25) was set against it. Over different tokens only,
    s would read (T s - 1) / (T - 1): for the 20 visible tokens the reference's s* = 0.75 is 0.737 in
    those terms (0.25 is 0.21), a different target. The logged `*_token_sim` diagnostics are this s
    too, so they read as the reference's `avg_sim_*` logs.

    Args:
        x: [B, T, C].
    """
    return pairwise_cosine(x.float(), include_self=True).mean()


def similarity_regulariser(pred: torch.Tensor, visible: torch.Tensor, s_target: float | torch.Tensor) -> torch.Tensor:
    """(s(pred) - s*)^2 + (s(visible) - s*)^2 (the caller multiplies by the coefficient)."""
    return (mean_token_similarity(pred) - s_target) ** 2 + (mean_token_similarity(visible) - s_target) ** 2


def collapse_cosine(tokens: torch.Tensor) -> torch.Tensor:
    """The paper's collapse diagnostic: mean cosine between the mean-pooled latents of different
    images of the batch (about 1.0: collapsed). tokens: [B, T, C]; NaN when B < 2."""
    if tokens.shape[0] < 2:
        return tokens.new_tensor(float("nan"))
    return pairwise_cosine(tokens.float().mean(1).unsqueeze(0), include_self=False)[0]


def effective_rank(features: torch.Tensor) -> torch.Tensor:
    """RankMe-style effective rank: exp(entropy) of the normalised singular values of the
    (uncentred) features [B, C]; from 1 (every image maps to one direction: collapse) to min(B, C).

    Not centred on purpose: a collapsed encoder gives near-identical features plus tiny noise,
    which centring would blow back up to a high rank.

    NaN when any feature is non-finite (a diverged run): the SVD of such a matrix raises on the CPU,
    and the trainer's loss guard, not this diagnostic, is what should report the divergence. Masked
    with `where` rather than tested in Python, so a GPU step does not synchronise for it."""
    x = features.float()
    finite = torch.isfinite(x).all()
    s = torch.linalg.svdvals(torch.where(finite, x, torch.zeros_like(x)))
    p = s / s.sum().clamp_min(1e-12)
    rank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return torch.where(finite, rank, torch.full_like(rank, float("nan")))


def normalised_pixels(patches: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """MAE targets: patches [B, T, C, P, P] -> [B, T, C*P*P], standardised per patch if `norm_pix`."""
    x = patches.flatten(2).float()
    if norm_pix:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True)
        x = (x - mean) / (var + 1e-6) ** 0.5
    return x
