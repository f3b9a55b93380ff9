"""Latent MIM on timm: online ViT + projector, EMA target, cross-attention decoder, losses."""
