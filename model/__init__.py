"""Latent MIM on timm: online ViT + projector, EMA target, cross-attention decoder, losses.

`from lmim.model import LatentMIM, ModelConfig` is the public entry point. The model class is imported
lazily so that light users (`lmim.model.masks`, `lmim.model.config`) do not pay for importing timm.
"""
from __future__ import annotations

# This folder is installed as lmim.model (pyproject.toml); a bare `import model` would load a second copy
# of every module (or a user's own model/ folder), so it is refused.
if __name__ != "lmim.model":
    raise ImportError(f"import lmim.model, not {__name__}: lmim's packages live under the lmim namespace.")

from typing import TYPE_CHECKING

from lmim.model.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from lmim.model.latent_mim import LatentMIM

__all__ = ["LatentMIM", "ModelConfig"]


def __getattr__(name: str):
    if name == "LatentMIM":
        from lmim.model.latent_mim import LatentMIM

        return LatentMIM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
