"""Nearest-neighbour classification of frozen features (top-1 %).

Two protocols, never to be confused (the paper and its reference code), so each has a `PROTOCOL_*` label that every
caller prints next to its number:

- `knn_loo1`: the paper's "NN" number: leave-one-out 1-nearest-neighbour with cosine similarity
  on L2-normalised features of ONE split (the evaluation split); each sample is classified by its
  most similar *other* sample.
- `knn_weighted`: the common DINO-style weighted k-NN: a memory bank of the training split,
  the k most similar bank entries vote with weight exp(cos / T).

Both work in query chunks so the similarity matrix is never materialised whole: memory is
chunk x N floats (50k x 50k would be 10 GB; 1024 x 50k is 200 MB).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PROTOCOL_LOO1 = "k-NN (leave-one-out 1-NN, cosine, eval split)"
PROTOCOL_KNN20 = "k-NN (weighted {k}-NN, T={T}, cosine, train-split memory bank)"


def knn_weighted_protocol(k: int = 20, T: float = 0.07) -> str:
    """The printable name of the weighted k-NN protocol with these settings."""
    return PROTOCOL_KNN20.format(k=k, T=T)


def _check(feats: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if feats.ndim != 2:
        raise ValueError(f"{what} features must be [N, D], got shape {tuple(feats.shape)}.")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"{what} labels must be [N] with N = {feats.shape[0]}, got shape {tuple(labels.shape)}.")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{what} split has unlabelled samples (label -1); k-NN needs a labelled dataset.")


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def knn_loo1_predictions(
    feats: torch.Tensor, labels: torch.Tensor, chunk: int = 1024, device: torch.device | str | None = None
) -> torch.Tensor:
    """[N] predicted labels of leave-one-out 1-NN (cosine); ties go to the lower index."""
    _check(feats, labels, "eval")
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"leave-one-out 1-NN needs at least 2 samples, got {n}.")
    dev = _default_device(device)
    x = F.normalize(feats.to(dev, torch.float32), dim=1)
    y = labels.to(dev)
    preds = torch.empty(n, dtype=torch.long, device=dev)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sim = x[start:stop] @ x.T                                         # [c, N]
        rows = torch.arange(stop - start, device=dev)
        sim[rows, rows + start] = -float("inf")                            # leave the query itself out
        preds[start:stop] = y[sim.argmax(1)]
    return preds.cpu()


def knn_loo1(feats: torch.Tensor, labels: torch.Tensor, chunk: int = 1024,
             device: torch.device | str | None = None) -> float:
    """Leave-one-out 1-NN top-1 accuracy (%) with cosine similarity on L2-normalised features.

    Args:
        feats: [N, D] features of the evaluation split.
        labels: [N] int64 class indices (>= 0).
        chunk: queries per similarity block.
        device: where to compute (default: CUDA when available).
    """
    preds = knn_loo1_predictions(feats, labels, chunk, device)
    return float((preds == labels.cpu()).float().mean() * 100.0)


@torch.no_grad()
def knn_weighted_predictions(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[M] predicted labels of DINO-style weighted k-NN against the training memory bank."""
    _check(train_feats, train_labels, "train")
    if test_feats.ndim != 2 or test_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(
            f"test features must be [M, {train_feats.shape[1]}] like the train features, got {tuple(test_feats.shape)}."
        )
    if k < 1 or T <= 0:
        raise ValueError(f"weighted k-NN needs k >= 1 and T > 0, got k={k}, T={T}.")
    dev = _default_device(device)
    bank = F.normalize(train_feats.to(dev, torch.float32), dim=1)
    bank_y = train_labels.to(dev)
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    k = min(k, bank.shape[0])
    q_all = F.normalize(test_feats.to(dev, torch.float32), dim=1)
    preds = torch.empty(q_all.shape[0], dtype=torch.long, device=dev)
    for start in range(0, q_all.shape[0], chunk):
        q = q_all[start:start + chunk]
        sim, idx = (q @ bank.T).topk(k, dim=1)                            # [c, k]
        votes = torch.zeros(q.shape[0], c, device=dev)
        # exp((cos - top cos) / T): the same votes up to a factor per row (so the same argmax), but
        # finite for any T; exp(cos / T) in float32 is inf for every neighbour once T < ~0.011.
        votes.scatter_add_(1, bank_y[idx], ((sim - sim[:, :1]) / T).exp())
        preds[start:start + q.shape[0]] = votes.argmax(1)
    return preds.cpu()


def knn_weighted(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    chunk: int = 1024,
    device: torch.device | str | None = None,
) -> float:
    """DINO-style weighted k-NN top-1 accuracy (%).

    The k most cosine-similar training samples vote for their class with weight exp(cos / T).

    Args:
        train_feats, train_labels: the memory bank, [N, D] and [N].
        test_feats, test_labels: the queries, [M, D] and [M].
        k: neighbours (20 is the common setting).
        T: temperature of the vote weights (0.07 as in DINO).
    """
    _check(test_feats, test_labels, "test")
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    preds = knn_weighted_predictions(train_feats, train_labels, test_feats, k, T, num_classes, chunk, device)
    return float((preds == test_labels.cpu()).float().mean() * 100.0)
