"""train/evaluate/supervised.py: the supervised ceiling (the same ViT trained with labels)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from lmim.train.evaluate.supervised import random_resized_crop_flip, train_supervised


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                             num_classes=0)


def toy_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: dark vs bright noisy images (normalised-looking values around -1 and +1)."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, 16, 16, generator=g) * 0.5 + (labels.float() * 2 - 1)[:, None, None, None]
    return images, labels


def mean_patch(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval().forward_features(images)[:, 1:].mean(1)


def test_learns_a_separable_toy_problem():
    enc = tiny_vit()
    before = [p.detach().clone() for p in enc.parameters()]
    images, labels = toy_data()
    out = train_supervised(enc, images, labels, num_classes=2, images_seen=600, batch_size=32, lr=3e-3)
    assert out["steps"] == 19 and out["images_seen"] == 600 and out["train_s"] > 0
    assert out["final_loss"] < 0.3                                  # chance is ln 2 = 0.69
    assert any(not torch.equal(a, b) for a, b in zip(before, enc.parameters()))   # trained in place
    assert enc.training                                              # mode restored
    # The encoder's own mean-pooled features now separate the classes: nearest class mean.
    feats = mean_patch(enc, images)
    centroids = torch.stack([feats[labels == c].mean(0) for c in (0, 1)])
    pred = torch.cdist(feats, centroids).argmin(1)
    assert (pred == labels).float().mean() > 0.9


def test_deterministic_under_the_seed():
    images, labels = toy_data(32)
    base = tiny_vit()
    runs = []
    for seed in (5, 5, 6):
        enc = copy.deepcopy(base)
        out = train_supervised(enc, images, labels, num_classes=2, images_seen=96, batch_size=16, seed=seed)
        runs.append((out["final_loss"], torch.cat([p.detach().flatten() for p in enc.parameters()])))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])


def test_crop_and_flip_geometry():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(3, 2, 1, 1)
    # Full-size crops: identity or a mirror image, nothing else.
    out = random_resized_crop_flip(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    for img in out:
        assert torch.allclose(img, x[0], atol=1e-5) or torch.allclose(img, x[0].flip(-1), atol=1e-5)
    out = random_resized_crop_flip(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    assert torch.allclose(out, x, atol=1e-5)
    # Smaller crops stay inside the value range of the image (bilinear, no padding).
    out = random_resized_crop_flip(x, g, scale=(0.2, 0.5))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 15


def test_rejects_bad_input():
    enc = tiny_vit()
    images, labels = toy_data(8)
    with pytest.raises(ValueError, match="labels must lie"):
        train_supervised(enc, images, labels + 5, num_classes=2, images_seen=8)
    with pytest.raises(ValueError, match="positive"):
        train_supervised(enc, images, labels, num_classes=2, images_seen=0)
