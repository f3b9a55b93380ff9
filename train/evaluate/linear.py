"""Linear probe on frozen features: train a linear classifier on the training split's features,
report top-1 (%) on the evaluation split.

Features are standardised with the TRAINING split's mean and std (the probe's BatchNorm-without-
affine of MAE's protocol, folded into preprocessing), which makes one learning rate work for
encoders whose feature scales differ by orders of magnitude (a random ViT vs a trained one vs raw
pixels). The classifier is trained with AdamW and a cosine schedule on shuffled mini-batches; on a
GPU when there is one. Cheap: the features are computed once, outside.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PROTOCOL_LINEAR = "linear probe (frozen features, standardised, AdamW {epochs} ep, top-1 on eval split)"


def linear_protocol(epochs: int = 100) -> str:
    return PROTOCOL_LINEAR.format(epochs=epochs)


def _check(feats: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if feats.ndim != 2:
        raise ValueError(f"{what} features must be [N, D], got shape {tuple(feats.shape)}.")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"{what} labels must be [N] with N = {feats.shape[0]}, got shape {tuple(labels.shape)}.")
    if labels.numel() == 0:
        raise ValueError(f"{what} split is empty.")
    if int(labels.min()) < 0:
        raise ValueError(f"{what} split has unlabelled samples (label -1); the linear probe needs labels.")


def standardise(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """(x - mean) / std with the training split's per-dimension statistics, applied to all."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(eps)   # constant dims (e.g. black borders) stay 0, not NaN
    return [(x - mean) / std for x in (train, *others)]


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, **settings) -> float:
    """Top-1 accuracy (%) on the test split of a linear classifier trained on frozen features
    (`fit_linear_probe`'s settings)."""
    return fit_linear_probe(train_feats, train_labels, test_feats, test_labels, **settings)[1]


def fit_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """(train top-1, test top-1) in % of a linear classifier trained on frozen features: the train
    figure tells an under-fitted probe (both low: more epochs or another lr) from a split that does
    not generalise (train high, test low).

    Args:
        train_feats, train_labels: [N, D] features and [N] labels to fit on.
        test_feats, test_labels: [M, D] and [M] to report on.
        epochs: passes over the training features.
        lr: peak AdamW learning rate (cosine-decayed to 0 over training).
        weight_decay: AdamW weight decay on the weight matrix.
        batch_size: mini-batch size.
        device: default CUDA when available, else CPU.
        seed: initialisation and shuffling seed (results are deterministic on the CPU).
    """
    _check(train_feats, train_labels, "train")
    _check(test_feats, test_labels, "test")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_feats.shape[1]} vs {test_feats.shape[1]}.")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)

    xtr, xte = standardise(train_feats.to(dev, torch.float32), test_feats.to(dev, torch.float32))
    ytr, yte = train_labels.to(dev), test_labels.to(dev)
    num_classes = int(max(int(ytr.max()), int(yte.max()))) + 1
    n, d = xtr.shape

    head = torch.nn.Linear(d, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, d, generator=gen) * 0.01)
        head.bias.zero_()
    head = head.to(dev)
    opt = torch.optim.AdamW(
        [{"params": [head.weight], "weight_decay": weight_decay}, {"params": [head.bias], "weight_decay": 0.0}],
        lr=lr,
    )
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    with torch.no_grad():
        def top1(x: torch.Tensor, y: torch.Tensor) -> float:
            preds = torch.cat([head(x[i:i + 4096]).argmax(1) for i in range(0, x.shape[0], 4096)])
            return float((preds == y).float().mean() * 100.0)

        return top1(xtr, ytr), top1(xte, yte)
