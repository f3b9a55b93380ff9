"""Accelerate-driven training: config, schedules, checkpoints, logging, evaluation."""
# timm/torchvision import guard for CPU-only torch; must run before timm is imported.
import model._torchvision_compat  # noqa: F401  isort:skip
