"""The supervised ceiling: the same ViT encoder trained with labels, for a given number of images.

The quality benchmark compares self-supervised encoders by frozen-feature k-NN / linear accuracy;
this trains the same architecture end to end with cross-entropy on the same images, to show how
far the labels alone could take it for the same number of images seen. The classifier reads the
features the frozen evaluations read (`lmim.train.evaluate.features`, pool "mean_patch": the mean of
the patch tokens after the final norm, CLS excluded), so the encoder it leaves behind is evaluated
on exactly the features it was trained through.

Augmentation runs in torch on the whole batch (no data loader): random-resized-crop as one affine
`grid_sample` per image (bilinear, back to the input size) and a horizontal flip folded into the
same affine map.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

__all__ = ["train_supervised", "random_resized_crop_flip"]


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator, *,
                             scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             hflip: bool = True) -> torch.Tensor:
    """A random-resized crop (and maybe a horizontal flip) of every image of a batch, back to its size.

    Each crop has area fraction ~ U(scale) and aspect ratio log-uniform in `ratio` (its sides clamped
    to the image: torchvision retries instead, a difference that only matters for extreme ratios),
    at a uniform position; it is resampled bilinearly by one affine grid per image. Random numbers
    come from `generator` (a CPU generator), so the result depends only on its state.
    """
    b = images.shape[0]
    rand = torch.rand(b, 5, generator=generator, dtype=torch.float64)
    area = scale[0] + rand[:, 0] * (scale[1] - scale[0])
    log_r = math.log(ratio[0]) + rand[:, 1] * (math.log(ratio[1]) - math.log(ratio[0]))
    # Sides as fractions of the image side (w / h = ratio, w * h = area).
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    # affine_grid works in [-1, 1] coordinates: a crop of side w centred at c spans c +- w.
    cx = (rand[:, 2] * 2 - 1) * (1 - w)
    cy = (rand[:, 3] * 2 - 1) * (1 - h)
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0) if hflip else torch.ones(b, dtype=torch.float64)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w * flip          # a negative x scale mirrors the crop
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices only; biases, norms and timm's `no_weight_decay()` tokens are exempt."""
    skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_supervised(encoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
                     images_seen: int, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
                     crop_scale: tuple[float, float] = (0.35, 1.0), hflip: bool = True, seed: int = 0,
                     device: torch.device | str = "cpu") -> dict:
    """Train `encoder` with labels: a linear head on its mean-pooled patch tokens, cross-entropy.

    Args:
        encoder: a timm VisionTransformer with num_classes=0; trained in place (left on `device`,
            in the train/eval mode it came in).
        images: normalised float [N, C, H, W] at the encoder's input size (grid * patch px).
        labels: int [N] in 0..num_classes-1.
        num_classes: width of the linear head (the head is discarded after training).
        images_seen: training length in images; ceil(images_seen / batch_size) steps, the last one
            smaller when batch_size does not divide it, so exactly `images_seen` images are seen.
        batch_size: images per step (fresh random order every pass over the data).
        lr: peak AdamW learning rate: linear warm-up over the first 5 % of steps, then cosine to 0.
        weight_decay: AdamW weight decay of weight matrices (not of biases, norms, pos_embed, cls_token).
        crop_scale: random-resized-crop area range (aspect ratio 3/4..4/3).
        hflip: random horizontal flips.
        seed: head initialisation, data order and augmentation; same seed, same result on one device.
        device: where to train.

    Returns:
        {"steps", "images_seen", "final_loss" (mean loss of the last max(1, steps // 10) steps, at most
        10), "train_s" (wall seconds of the training loop)}.
    """
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need images [N, C, H, W] and labels [N] with N > 0, got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}.")
    if images_seen <= 0 or batch_size <= 0:
        raise ValueError(f"images_seen and batch_size must be positive, got {images_seen} and {batch_size}.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}.")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)     # CPU generator: the same stream on any device
    n = images.shape[0]
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    dim = int(getattr(encoder, "embed_dim", 0) or getattr(encoder, "num_features"))

    head = torch.nn.Linear(dim, num_classes)
    with torch.no_grad():                         # small init (as the linear probe): start near uniform logits
        head.weight.copy_(torch.randn(num_classes, dim, generator=gen) * 0.01)
        head.bias.zero_()
    was_training = encoder.training
    encoder.to(dev).train()
    head.to(dev).train()
    opt = torch.optim.AdamW(_param_groups(encoder, weight_decay) + _param_groups(head, weight_decay), lr=lr)
    steps = math.ceil(images_seen / batch_size)
    warmup = max(1, round(0.05 * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    order = torch.empty(0, dtype=torch.long)
    losses: list[torch.Tensor] = []
    labels = labels.long()
    start_t = time.perf_counter()
    for step in range(steps):
        b = min(batch_size, images_seen - step * batch_size)
        while order.numel() < b:                   # passes over the data, each in a fresh random order
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:b], order[b:]
        x = images[idx].to(dev, non_blocking=True)
        y = labels[idx].to(dev, non_blocking=True)
        x = random_resized_crop_flip(x, gen, scale=crop_scale, hflip=hflip)
        tokens = encoder.forward_features(x)
        logits = head(tokens[:, prefix:].mean(1))   # the "mean_patch" features of lmim.train.evaluate.features
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())               # no .item(): no device sync per step
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)                # queued kernels belong to the training time
    train_s = time.perf_counter() - start_t
    encoder.train(was_training)
    tail = max(1, min(10, steps // 10))
    return {"steps": steps, "images_seen": images_seen, "final_loss": float(torch.stack(losses[-tail:]).mean()),
            "train_s": train_s}
