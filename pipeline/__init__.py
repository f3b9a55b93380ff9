"""Shards on storage -> masked batches on the device (NVIDIA DALI)."""
# timm/torchvision import guard for CPU-only torch; must run before timm is imported.
import model._torchvision_compat  # noqa: F401  isort:skip
from pipeline.batch import Batch

__all__ = ["Batch"]
