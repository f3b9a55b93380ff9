"""LatentMIM: online ViT + projector, EMA target, decoder, objective and diagnostics in one module.

Usage per optimizer step (the trainer's loop):

    out = model(batch.images, batch.visible, batch.target, sim_target=s_star)
    out["loss"].backward(); optimizer.step(); optimizer.zero_grad()
    model.update_target(momentum)          # EMA of online encoder + projector into the target

Objectives (`cfg.objective`):
- "infonce" (default): patch InfoNCE against the EMA target's projector outputs.
- "norm_l2": MSE to per-token standardised EMA targets (the paper's ablation).
- "mae": pixel reconstruction of the masked patches (normalised pixels) with MAE's decoder.
- "naive_mse": MSE to the online encoder's own latents of the masked patches, with gradients
  through both (joint training, no EMA): the variant that collapses.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lmim.model.attention import attention_kernels, use_cpu_attention
from lmim.model.config import ModelConfig
from lmim.model.cpu_linear import use_cpu_linear
from lmim.model.decoder import LatentDecoder, MAEDecoder
from lmim.model.encoder import Projector, build_encoder, encode_patches
from lmim.model.losses import (
    collapse_cosine,
    effective_rank,
    mean_token_similarity,
    norm_l2_loss,
    normalised_pixels,
    patch_infonce,
    similarity_regulariser,
)
from lmim.model.masks import gather_patches
from lmim.model.patch_gap import extract_patches

OBJECTIVES = ("infonce", "norm_l2", "mae", "naive_mse")
EMA_OBJECTIVES = ("infonce", "norm_l2")

# Parameter names (last component) that never get weight decay, besides every parameter with
# ndim <= 1 (biases, norm weights). The paper: none on position/patch embeddings and tokens.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "cls_query")


class LatentMIM(nn.Module):
    """Latent masked image modelling on a timm ViT (the paper and its reference code). See the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"model.objective {cfg.objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}.")
        if cfg.target_sees not in ("masked", "all"):
            raise ValueError(f"model.target_sees must be 'masked' or 'all', got {cfg.target_sees!r}.")
        if cfg.patch_gap < 0 or cfg.patch_gap == 1:
            # Offsets are drawn in 0..gap-1: a gap of 1 never jitters, it only drops pixels.
            raise ValueError(f"model.patch_gap must be 0 (no gap) or at least 2 (1 cannot jitter), got {cfg.patch_gap}.")
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        dim = self.encoder.embed_dim
        self.num_patches = cfg.grid_size * cfg.grid_size
        if cfg.objective == "mae":
            # MAE has no projector: the decoder reads the encoder output directly.
            self.projector = None
            self.decoder = MAEDecoder(dim, cfg.in_chans * cfg.patch_size**2, cfg)
        else:
            self.projector = Projector(dim, cfg.projector_hidden_dim, cfg.projector_layers, cfg.init)
            self.decoder = LatentDecoder(dim, dim, cfg)
        self.target_encoder: nn.Module | None = None
        self.target_projector: nn.Module | None = None
        if cfg.objective in EMA_OBJECTIVES:
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
            self.train(self.training)  # puts the target in eval mode
        use_cpu_linear(self)  # fp32 CPU GEMMs through oneDNN (model/cpu_linear.py); nn.Linear elsewhere
        use_cpu_attention(self)  # the encoders' attention kernel under CPU bf16 autocast (model/attention.py)

    # ----------------------------------------------------------------------------------- helpers
    def train(self, mode: bool = True) -> "LatentMIM":
        """The EMA target stays in eval mode (no drop path): its outputs are targets, not samples."""
        super().train(mode)
        if self.target_encoder is not None:
            self.target_encoder.eval()
            self.target_projector.eval()
        return self

    @property
    def has_ema_target(self) -> bool:
        return self.target_encoder is not None

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, C, P, P]; the random patch gap applies when H = G * (P + gap)."""
        cfg = self.cfg
        h, w = images.shape[-2:]
        train_side = cfg.grid_size * (cfg.patch_size + cfg.patch_gap)
        eval_side = cfg.grid_size * cfg.patch_size
        if h != w or h not in (train_side, eval_side):
            raise ValueError(
                f"images are {h}x{w} px; this model takes {train_side} px (grid {cfg.grid_size} x (patch "
                f"{cfg.patch_size} + gap {cfg.patch_gap}), training) or {eval_side} px (no gap); fix the crop size "
                "or model.grid_size/patch_size/patch_gap."
            )
        gap = cfg.patch_gap if h == train_side else 0
        return extract_patches(images, cfg.grid_size, cfg.patch_size, gap)

    def _targets(self, patches: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Target latents [B, T, D] of the masked patches (EMA target, no grad)."""
        assert self.target_encoder is not None and self.target_projector is not None
        with torch.no_grad():
            if self.cfg.target_sees == "masked":
                tok = encode_patches(self.target_encoder, patches, target)[:, 1:]
            else:
                tok = gather_patches(encode_patches(self.target_encoder, patches, None)[:, 1:], target)
            return self.target_projector(tok).detach()

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        images: torch.Tensor,
        visible: torch.Tensor,
        target: torch.Tensor,
        sim_target: float | torch.Tensor | None = None,
        metrics: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One training forward pass.

        Args:
            images: [B, C, H, W]; H = W = grid * (patch + gap) (training, random gap) or grid * patch.
            visible: [B, K] int64 patch indices the online encoder sees.
            target: [B, T] int64 patch indices to predict (disjoint from `visible`).
            sim_target: s* of the similarity regulariser (required when `sim_reg_coef > 0`).
            metrics: compute the diagnostics below; False returns only `loss`, `loss_pred` and
                `loss_sim` (skips an SVD, which synchronises a GPU, on steps that are not logged).

        Returns:
            `loss` (scalar with grad) and detached float32 scalars:
            - `loss_pred`: the objective; `loss_sim`: the similarity regulariser (before its coefficient);
            - `collapse_cos`: mean cosine between different images' mean-pooled online encoder
              outputs (visible patch tokens, CLS excluded); about 1.0 means collapse;
            - `pred_token_sim` / `visible_token_sim` / `target_token_sim`: mean pairwise cosine of
              the tokens within an image (predictions; online projector outputs at the visible
              patches; targets), averaged over the batch;
            - `effective_rank`: exp(entropy) of the singular values of the batch's mean-pooled
              online features (1 = all images alike, up to min(B, D)).
            `sim_target` may be a 0-dim tensor (avoids recompiles under torch.compile).
        """
        with attention_kernels(images.device):
            return self._forward(images, visible, target, sim_target, metrics)

    def _forward(self, images: torch.Tensor, visible: torch.Tensor, target: torch.Tensor,
                 sim_target: float | torch.Tensor | None, metrics: bool) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if visible.shape[0] != images.shape[0] or target.shape[0] != images.shape[0]:
            raise ValueError(
                f"batch sizes differ: images {images.shape[0]}, visible {visible.shape[0]}, target {target.shape[0]}."
            )
        patches = self.patchify(images)                                   # [B, N, C, P, P]
        enc = encode_patches(self.encoder, patches, visible)              # [B, 1+K, D]

        if cfg.objective == "mae":
            latents = enc
            pred = self.decoder(enc, visible, target)                     # [B, T, C*P*P]
            tgt = normalised_pixels(gather_patches(patches.flatten(2), target).view(
                *target.shape, *patches.shape[2:]), cfg.mae_norm_pix)
            loss_pred = torch.nn.functional.mse_loss(pred.float(), tgt)
        else:
            assert self.projector is not None
            latents = self.projector(enc)                                 # [B, 1+K, D]
            pred = self.decoder(latents, visible, target)                 # [B, T, D]
            if cfg.objective == "naive_mse":
                # Joint training: the online network produces its own targets, with gradients.
                tgt = self.projector(encode_patches(self.encoder, patches, target)[:, 1:])
                loss_pred = torch.nn.functional.mse_loss(pred.float(), tgt.float())
            else:
                tgt = self._targets(patches, target)
                if cfg.objective == "infonce":
                    loss_pred = patch_infonce(pred, tgt, cfg.tau)
                else:
                    loss_pred = norm_l2_loss(pred, tgt)

        loss = loss_pred
        loss_sim = loss_pred.new_zeros(())
        if cfg.sim_reg_coef > 0 and cfg.objective != "mae":
            if sim_target is None:
                raise ValueError("model.sim_reg_coef > 0 needs sim_target (s*, scheduled by the trainer) in forward().")
            loss_sim = similarity_regulariser(pred, latents[:, 1:], sim_target)
            loss = loss + cfg.sim_reg_coef * loss_sim

        out = {"loss": loss, "loss_pred": loss_pred.detach().float(), "loss_sim": loss_sim.detach().float()}
        if not metrics:
            return out
        with torch.no_grad():
            pooled = enc[:, 1:].float()
            out |= {
                "collapse_cos": collapse_cosine(pooled),
                "pred_token_sim": mean_token_similarity(pred.detach()),
                "visible_token_sim": mean_token_similarity(latents[:, 1:].detach()),
                "target_token_sim": mean_token_similarity(tgt.detach()),
                "effective_rank": effective_rank(pooled.mean(1)),
            }
        return out

    # ----------------------------------------------------------------------------------- EMA
    def online_target_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target tensors, online tensors) in matching order: params and floating buffers."""
        if not self.has_ema_target:
            return [], []
        tgt, src = [], []
        for t_mod, s_mod in ((self.target_encoder, self.encoder), (self.target_projector, self.projector)):
            for (tn, tp), (sn, sp) in zip(t_mod.named_parameters(), s_mod.named_parameters()):
                assert tn == sn
                tgt.append(tp)
                src.append(sp)
            for (tn, tb), (sn, sb) in zip(t_mod.named_buffers(), s_mod.named_buffers()):
                if tb.is_floating_point():
                    tgt.append(tb)
                    src.append(sb)
        return tgt, src

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, for every target tensor.

        One fused multi-tensor `torch._foreach_lerp_` call. A no-op for objectives without an
        EMA target ("mae", "naive_mse").
        """
        tgt, src = self.online_target_pairs()
        if not tgt:
            return
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}.")
        torch._foreach_lerp_(tgt, src, 1.0 - float(momentum))

    # ----------------------------------------------------------------------------------- optimiser
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups over the trainable parameters (never the EMA target).

        No decay on biases, norms and every other parameter with ndim <= 1, position/patch
        embeddings, CLS/mask tokens (the paper and its reference code).
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or name.startswith(("target_encoder.", "target_projector.")):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim <= 1 or leaf in _NO_DECAY_NAMES or name.startswith("encoder.patch_embed."):
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
