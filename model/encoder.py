"""The online/target encoder: a stock timm VisionTransformer, run on a subset of patches.

The ViT is built by `timm.create_model` (so the trained weights are a plain timm state dict) with
frozen 2-D sin-cos position embeddings written into its `pos_embed` (CLS position = zeros, as in
MAE). `encode_patches` runs timm's own modules (patch_embed.proj/norm, cls_token, pos_embed,
norm_pre, blocks, norm) on only the selected patches plus CLS; with all patches selected it equals
`vit.forward_features` on the gap-free image (tested).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lmim.model.config import ModelConfig
from lmim.model.cpu_linear import cpu_linear
from lmim.model.init import init_linear_, reference_init_vit_
from lmim.model.masks import gather_patches

import timm  # noqa: E402
from timm.layers import LayerNorm  # noqa: E402
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


def encoder_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for `timm.create_model(cfg.arch, **kwargs)` that rebuild the encoder.

    These describe the evaluation-time model (img_size = grid * patch, no gap, no classifier head);
    training-only options (drop path) are left out so the exported model is a clean feature extractor.
    """
    kw: dict = dict(
        img_size=cfg.grid_size * cfg.patch_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=0,
    )
    for name in ("embed_dim", "depth", "num_heads"):
        value = getattr(cfg, name)
        if value is not None:
            kw[name] = int(value)
    return kw


def arch_problem(arch: str) -> str | None:
    """Why `build_encoder` cannot build `arch`, judged from timm's registry alone (nothing is built),
    or None when it is a name of timm's vision_transformer module (the rest is checked by building).
    """
    from difflib import get_close_matches

    from timm.models import is_model, is_model_in_modules, list_models

    if is_model_in_modules(arch, ("vision_transformer",)):
        return None
    if is_model(arch):
        return "it is a timm model but not a VisionTransformer"
    close = get_close_matches(arch, list_models(module="vision_transformer"), n=1)
    return "timm has no model of that name" + (f" (did you mean {close[0]!r}?)" if close else "")


def sincos_pos_embed(grid_size: int, dim: int, cls_token: bool = True) -> torch.Tensor:
    """[1, (1 +) G*G, dim] 2-D sin-cos embedding in row-major grid order; the CLS row is zeros."""
    pe = build_sincos2d_pos_embed([grid_size, grid_size], dim=dim)
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim), pe], 0)
    return pe.unsqueeze(0)


def build_encoder(cfg: ModelConfig) -> VisionTransformer:
    """A timm ViT per `cfg`, initialised per `cfg.init` (model/init.py), with frozen sin-cos
    position embeddings (the paper and its reference code)."""
    kw = encoder_kwargs(cfg)
    vit = timm.create_model(cfg.arch, pretrained=False, drop_path_rate=cfg.drop_path_rate, **kw)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"model.arch {cfg.arch!r} is not a timm VisionTransformer; pick a vit_* model name.")
    if vit.cls_token is None or vit.no_embed_class or vit.num_reg_tokens or vit.pos_embed is None:
        raise ValueError(
            f"model.arch {cfg.arch!r} must have a class token, one pos-embed row per token and no "
            "register tokens (a standard ViT such as vit_base_patch16_224)."
        )
    if cfg.init == "reference":
        reference_init_vit_(vit)
    elif cfg.init != "timm":
        raise ValueError(f"model.init must be 'reference' or 'timm', got {cfg.init!r}.")
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed(cfg.grid_size, vit.embed_dim))
    vit.pos_embed.requires_grad_(False)
    return vit


def embed_patches(vit: VisionTransformer, patches: torch.Tensor) -> torch.Tensor:
    """Patch-embed pixel patches with the ViT's own patch projection.

    Args:
        patches: [B, K, C, P, P] pixel patches.

    Returns:
        [B, K, D] patch tokens (no position embedding yet).
    """
    proj = vit.patch_embed.proj
    # The patch conv (kernel = stride = P) on one P x P patch is a matmul with its flattened
    # kernel ([D, C, P, P] -> [D, C*P*P], the same C, y, x order as the patch): one GEMM.
    x = cpu_linear(patches.flatten(2), proj.weight.flatten(1), proj.bias)
    return vit.patch_embed.norm(x)


def encode_patches(vit: VisionTransformer, patches: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Run the ViT on the selected patches plus CLS.

    Args:
        vit: a VisionTransformer from `build_encoder`.
        patches: [B, N, C, P, P] all pixel patches of the images.
        idx: [B, K] int64 patch indices to encode, or None for all N.

    Returns:
        [B, 1 + K, D] tokens after the final norm; token 0 is CLS.
    """
    pos = vit.pos_embed
    if idx is not None:
        patches = torch.gather(patches, 1, idx.view(*idx.shape, 1, 1, 1).expand(-1, -1, *patches.shape[2:]))
        patch_pos = gather_patches(pos[:, 1:].expand(idx.shape[0], -1, -1), idx)
    else:
        patch_pos = pos[:, 1:]
    x = embed_patches(vit, patches) + patch_pos
    cls = (vit.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls.to(x.dtype), x], 1)
    x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
    x = vit.blocks(x)
    return vit.norm(x)


class Projector(nn.Sequential):
    """The paper's projector: [Linear(no bias) -> LN -> GELU] x (layers - 1), Linear(no bias) -> LN."""

    def __init__(self, dim: int, hidden_dim: int, layers: int = 3, init: str = "reference"):
        if layers < 1:
            raise ValueError(f"model.projector_layers must be at least 1, got {layers}.")
        mods: list[nn.Module] = []
        in_dim = dim
        for _ in range(layers - 1):
            mods += [nn.Linear(in_dim, hidden_dim, bias=False), LayerNorm(hidden_dim, eps=1e-6), nn.GELU()]
            in_dim = hidden_dim
        mods += [nn.Linear(in_dim, dim, bias=False), LayerNorm(dim, eps=1e-6)]
        super().__init__(*mods)
        init_linear_(self, init)
