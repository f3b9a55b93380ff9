"""Latent MIM on timm: online ViT + projector, EMA target, cross-attention decoder, losses.

`from model import LatentMIM, ModelConfig` is the public entry point. The model class is imported
lazily so that light users (`model.masks`, `model.config`) do not pay for importing timm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

# Must run before anything imports timm (see the module for why).
from model import _torchvision_compat  # noqa: F401  isort:skip
from model.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from model.latent_mim import LatentMIM

__all__ = ["LatentMIM", "ModelConfig"]


def __getattr__(name: str):
    if name == "LatentMIM":
        from model.latent_mim import LatentMIM

        return LatentMIM
    raise AttributeError(f"module 'model' has no attribute {name!r}")
