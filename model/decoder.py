"""Decoders: the Latent MIM cross-attention decoder with visual-cue queries, and MAE's decoder.

Both use timm building blocks (Mlp, Block, LayerNorm); the Latent MIM decoder's self- and
cross-attention pick their kernel through `lmim.model.attention.attend` (fused SDPA, or the
explicit form for narrow heads in fp32 on the CPU), MAE's decoder uses timm's Block. Frozen 2-D
sin-cos position embeddings are non-persistent buffers (recomputed, so they are not in checkpoints).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmim.model.attention import attend
from lmim.model.config import ModelConfig
from lmim.model.encoder import sincos_pos_embed
from lmim.model.init import init_linear_
from lmim.model.masks import gather_patches

from timm.layers import LayerNorm, Mlp  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402


class SelfAttention(nn.Module):
    """Multi-head self-attention among the queries [B, T, C]: timm's `Attention` (fused qkv with
    bias, output projection; the same parameter names) with the kernel chosen by `attend`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class CrossAttention(nn.Module):
    """Multi-head attention from queries [B, T, C] to a memory [B, K, C] (kernel chosen by `attend`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        k_len = memory.shape[1]
        h = self.num_heads
        q = self.q(x).view(b, t, h, c // h).transpose(1, 2)
        k, v = self.kv(memory).view(b, k_len, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class CrossDecoderBlock(nn.Module):
    """Pre-norm residual block: [self-attention among queries], cross-attention to memory, MLP.

    The memory has its own LayerNorm in every block (the paper and its reference code).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, self_attn: bool = True):
        super().__init__()
        self.self_attn = self_attn
        if self_attn:
            self.norm1 = LayerNorm(dim, eps=1e-6)
            self.attn = SelfAttention(dim, num_heads, qkv_bias=True)
        self.norm_q = LayerNorm(dim, eps=1e-6)
        self.norm_kv = LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.self_attn:
            x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_q(x), self.norm_kv(memory))
        return x + self.mlp(self.norm2(x))


class LatentDecoder(nn.Module):
    """Latent MIM decoder: predicts target-patch latents from the visible latents.

    Queries = a learned decoder CLS (with query self-attention) + one per target patch. A patch query starts as the learned
    mask token (zero init) plus, with `visual_cues`, the parameter-free positional attention
    average softmax(pe_q . pe_v / sqrt(d)) of the embedded visible tokens, plus its own position
    embedding. Keys/values = embedded encoder outputs (CLS included) + their position embeddings.
    Output: LayerNorm -> Linear to `out_dim`; the CLS output is dropped.
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: ModelConfig):
        super().__init__()
        d = cfg.decoder_dim
        self.visual_cues = cfg.visual_cues
        self.embed = nn.Linear(in_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        # The decoder CLS query only acts through self-attention among queries; without it, it
        # would be an unused parameter (and break DDP without find_unused_parameters).
        self.cls_query = nn.Parameter(torch.zeros(1, 1, d)) if cfg.query_self_attn else None
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.grid_size, d), persistent=False)
        self.blocks = nn.ModuleList(
            CrossDecoderBlock(d, cfg.decoder_num_heads, cfg.decoder_mlp_ratio, cfg.query_self_attn)
            for _ in range(cfg.decoder_depth)
        )
        self.norm = LayerNorm(d, eps=1e-6)
        self.pred = nn.Linear(d, out_dim)
        init_linear_(self, cfg.init)
        if self.cls_query is not None:
            nn.init.normal_(self.cls_query, std=0.02)

    def forward(self, memory: torch.Tensor, visible: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            memory: [B, 1 + K, E] online latents (CLS first) at the visible patches.
            visible: [B, K] their patch indices.
            target: [B, T] patch indices to predict.

        Returns:
            [B, T, out_dim] predictions.
        """
        b = memory.shape[0]
        mem = self.embed(memory)                                         # [B, 1+K, d]
        pe = self.pos_embed[:, 1:].expand(b, -1, -1).to(mem.dtype)       # [B, N, d]
        pe_v = gather_patches(pe, visible)                               # [B, K, d]
        pe_q = gather_patches(pe, target)                                # [B, T, d]
        queries = self.mask_token.to(mem.dtype) + pe_q
        if self.visual_cues:
            # Positional attention (one head, scale 1/sqrt(d)): average the embedded visible tokens.
            cues = F.scaled_dot_product_attention(pe_q.unsqueeze(1), pe_v.unsqueeze(1), mem[:, 1:].unsqueeze(1))
            queries = queries + cues.squeeze(1)
        kv = mem + torch.cat([self.pos_embed[:, :1].to(mem.dtype).expand(b, -1, -1), pe_v], 1)
        if self.cls_query is None:
            x = queries
        else:
            x = torch.cat([self.cls_query.to(mem.dtype).expand(b, -1, -1), queries], 1)
        for blk in self.blocks:
            x = blk(x, kv)
        x = self.pred(self.norm(x))
        return x if self.cls_query is None else x[:, 1:]


class MAEDecoder(nn.Module):
    """MAE's decoder: visible tokens + mask tokens at every position, self-attention blocks,
    a linear head to pixels; used by the pixel-reconstruction baseline objective ("mae")."""

    def __init__(self, in_dim: int, pixels_per_patch: int, cfg: ModelConfig):
        super().__init__()
        d = cfg.decoder_dim
        self.embed = nn.Linear(in_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.grid_size, d), persistent=False)
        self.blocks = nn.Sequential(*[
            Block(d, cfg.decoder_num_heads, cfg.decoder_mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(cfg.decoder_depth)
        ])
        self.norm = LayerNorm(d, eps=1e-6)
        self.pred = nn.Linear(d, pixels_per_patch)
        init_linear_(self, cfg.init)
        nn.init.normal_(self.mask_token, std=0.02)  # MAE's init

    def forward(self, memory: torch.Tensor, visible: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """memory [B, 1+K, E], visible [B, K], target [B, T] -> pixel predictions [B, T, C*P*P]."""
        b = memory.shape[0]
        n = self.pos_embed.shape[1] - 1
        mem = self.embed(memory)
        full = self.mask_token.to(mem.dtype).expand(b, n, -1)
        full = full.scatter(1, visible.unsqueeze(-1).expand(-1, -1, mem.shape[-1]), mem[:, 1:])
        x = torch.cat([mem[:, :1], full], 1) + self.pos_embed.to(mem.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(gather_patches(x[:, 1:], target))
