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
                      retry: RetryPolicy | None = None, least: int = 1, needs: str = "k-NN") -> list[str]:
    """The class names of the dataset at `url` (called `name` in messages).

    Raises:
        DataError: no dataset there (read_manifest's own sentence).
        SplitError: it has no class labels, one class only (any encoder then scores 100%), or fewer
            than `least` images (for what `needs` names).
    """
    manifest = read_manifest(url, storage_options or {}, retry=retry)
    if not manifest.classes:
        raise SplitError(f"{name} has no class labels (build it from a folder tree with class sub-folders)")
    if len(manifest.classes) < 2:
        raise SplitError(f"{name} has one class only ({manifest.classes[0]!r}): every encoder would score 100%; "
                         "evaluate on a split with at least 2 classes")
    if manifest.total_samples < least:
        raise SplitError(f"{name} holds {manifest.total_samples} image(s); {needs} needs at least {least}")
    return list(manifest.classes)


def check_same_classes(bank_name: str, bank: list[str], scored_name: str, scored: list[str]) -> None:
    """A k-NN memory bank and the split it scores must name the same classes in the same order."""
    if bank == scored:
        return
    only_bank, only_scored = [c for c in bank if c not in scored], [c for c in scored if c not in bank]
    if only_bank or only_scored:
        differ = "; ".join(f"only {where} has {_few(names)}" for where, names in
                           ((bank_name, only_bank), (scored_name, only_scored)) if names)
    else:
        differ = "the same class names in another order"
    raise SplitError(f"{bank_name} and {scored_name} have different classes ({differ}): their labels would not "
                     "mean the same thing; use two splits of one labelled dataset")


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
