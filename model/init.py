"""Weight initialisation schemes: the reference implementation's (default) and timm's.

`model.init: reference` (the default) follows the authors' code (`vits.py` / `xvits.py`, which
follow the JAX ViT and MAE): every `nn.Linear` (the fused qkv, the MLPs, the projector, the
decoder) gets `xavier_uniform_` and a zero bias; the patch embedding is xavier-uniform over its
kernel viewed as a Linear [D, C*P*P]; the CLS token is N(0, 0.02); LayerNorms are weight 1, bias 0.

`model.init: timm` keeps timm's ViT default instead (truncated normal with std 0.02 for every
Linear, PyTorch's default conv init for the patch embedding, CLS N(0, 1e-6)).

Why the reference scheme is the default: xavier-uniform's std is sqrt(2 / (fan_in + fan_out)),
which at the small widths a CPU can train (96-384) is 3-5x larger than 0.02. A short run starts
from much more diverse features: at random init on Fashion-MNIST the weighted 20-NN was 63.3%
with the reference scheme against 54.1% with timm's, and after one epoch of the reference recipe
the reference scheme alone took lmim from 72.7% to 78.9% (docs/BENCHMARKS.md). MAE's reference
code uses the same scheme, so the pixel baseline stays a fair comparison.
"""
from __future__ import annotations

import torch
import torch.nn as nn


from timm.layers import PatchEmbed  # noqa: E402

INIT_SCHEMES = ("reference", "timm")


@torch.no_grad()
def xavier_linear_(module: nn.Module) -> None:
    """xavier_uniform_ weight and zero bias for every nn.Linear in `module`; LayerNorm to (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def trunc_normal_linear_(module: nn.Module, std: float = 0.02) -> None:
    """timm's scheme: truncated-normal weight (std 0.02) and zero bias for every nn.Linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def reference_init_vit_(vit: nn.Module) -> None:
    """Re-initialise a timm VisionTransformer the way the reference code initialises its ViT.

    Position embeddings are left alone (they are frozen sin-cos, written by `build_encoder`).
    """
    xavier_linear_(vit)
    patch_embed = getattr(vit, "patch_embed", None)
    if isinstance(patch_embed, PatchEmbed):
        w = patch_embed.proj.weight                      # [D, C, P, P]
        # The conv is a Linear over the flattened patch: fan_in = C*P*P, fan_out = D. (xavier on
        # the 4-D tensor would count fan_out as D*P*P and draw P times smaller weights.)
        flat = torch.empty(w.shape[0], w[0].numel(), dtype=w.dtype, device=w.device)
        nn.init.xavier_uniform_(flat)
        w.copy_(flat.view_as(w))
        if patch_embed.proj.bias is not None:
            nn.init.zeros_(patch_embed.proj.bias)
    if getattr(vit, "cls_token", None) is not None:
        nn.init.normal_(vit.cls_token, std=0.02)


def init_linear_(module: nn.Module, scheme: str) -> None:
    """Initialise the Linear layers of a projector or decoder per `scheme` (see INIT_SCHEMES)."""
    if scheme == "reference":
        xavier_linear_(module)
    elif scheme == "timm":
        trunc_normal_linear_(module)
    else:
        raise ValueError(f"model.init must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}.")
