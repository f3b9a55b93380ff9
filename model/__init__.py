"""Latent MIM on timm: online ViT + projector, EMA target, cross-attention decoder, losses."""
# Must run before anything imports timm (see the module for why).
from model import _torchvision_compat  # noqa: F401  isort:skip
