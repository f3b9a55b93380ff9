"""Model configuration (the `model:` section of a training config).

This dataclass is the contract between `model/` and `train/`: the trainer's structured config
embeds it, so fields may be added (with defaults) but not renamed. Defaults are the reference
ViT-B/16 configuration of the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


# The per-step diagnostics `LatentMIM.forward(metrics=True)` reports where a value near 1.0 means
# every image (or token) looks alike; `collapse_guard.metric` may watch any of them.
COLLAPSE_METRICS = ("collapse_cos", "pred_token_sim", "visible_token_sim", "target_token_sim")


@dataclass
class ModelConfig:
    # Encoder: any timm ViT name; embed_dim/depth/num_heads override it for tiny test/CPU sizes.
    arch: str = "vit_base_patch16_224"
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: int = 16
    grid_size: int = 14            # patches per side: 14 x 14 = 196 tokens
    patch_gap: int = 4             # training crop is grid * (patch + gap) px; 0 disables the gap
    in_chans: int = 3
    drop_path_rate: float = 0.0
    # Weight init: "reference" (the authors' code: xavier-uniform Linears and patch embedding,
    # CLS N(0, 0.02); model/init.py says why it is the default) | "timm" (truncated normal 0.02).
    init: str = "reference"

    # Projector: Linear(no bias) -> LN -> GELU, x (layers - 1), then Linear -> LN.
    projector_hidden_dim: int = 4096
    projector_layers: int = 3

    # Target encoder.
    target_sees: str = "masked"    # "masked" (reference: only the target patches + CLS) | "all"

    # Decoder.
    decoder_dim: int = 512
    decoder_depth: int = 3
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    visual_cues: bool = True       # queries start from the positional-attention average of visible latents
    query_self_attn: bool = True   # self-attention among queries in each decoder block

    # Objective: "infonce" (Latent MIM default) | "norm_l2" (MSE ablation) |
    # "mae" (pixel-reconstruction baseline) | "naive_mse" (joint online/target training, no EMA).
    objective: str = "infonce"
    tau: float = 0.2
    sim_reg_coef: float = 0.0      # 0.1 for the paper's ViT-B result; target s* is scheduled by train/
    mae_norm_pix: bool = True
