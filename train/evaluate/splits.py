"""The labelled splits a k-NN evaluation reads, checked from their manifests before any feature is
extracted or any training step is taken: each has class labels and enough images, and a memory bank
has the same classes as the split it scores."""
from __future__ import annotations

from typing import Any

from lmim.pipeline.format.manifest import read_manifest
from lmim.pipeline.storage import RetryPolicy

__all__ = ["SplitError", "knn_split_classes", "check_same_classes"]


class SplitError(ValueError):
    """A split k-NN cannot use, as one sentence (without the final full stop: callers add advice)."""


def knn_split_classes(url: str, name: str, *, storage_options: dict[str, Any] | None = None,
                      retry: RetryPolicy | None = None, least: int = 1) -> list[str]:
    """The class names of the dataset at `url` (called `name` in messages).

    Raises:
        DataError: no dataset there (read_manifest's own sentence).
        SplitError: it has no class labels, or fewer than `least` images.
    """
    manifest = read_manifest(url, storage_options or {}, retry=retry)
    if not manifest.classes:
        raise SplitError(f"{name} has no class labels (build it from a folder tree with class sub-folders)")
    if manifest.total_samples < least:
        raise SplitError(f"{name} holds {manifest.total_samples} image(s); k-NN needs at least {least}")
    return list(manifest.classes)


def check_same_classes(bank_name: str, bank: list[str], scored_name: str, scored: list[str]) -> None:
    """A k-NN memory bank and the split it scores must name the same classes in the same order."""
    if bank != scored:
        raise SplitError(f"{bank_name} and {scored_name} have different classes ({bank[:3]}... against "
                         f"{scored[:3]}...): their labels would not mean the same thing; use two splits of one "
                         "labelled dataset")
