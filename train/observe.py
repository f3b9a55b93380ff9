"""Observability for the training loop: a JSONL metrics log, the collapse guard, end-of-run plots.

TensorBoard / W&B go through Accelerate's trackers in `lmim.train.pretrain`; this module keeps a plain
`metrics.jsonl` beside them (one line per logged step, easy to diff and to plot without
TensorBoard) and draws the PNGs from it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from lmim.train.evaluate.figures import save_figure

__all__ = ["MetricsWriter", "read_metrics", "CollapseGuard", "flatten_for_tracker", "plot_curves", "plot_masks"]


class MetricsWriter:
    """Appends one JSON object per logged step to `path` (process 0 only); flushed each line so a
    killed run keeps everything it logged."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            # An undefined value (e.g. a cross-image similarity of a 1-image batch) is null: NaN and
            # Infinity are not JSON, and strict readers (browsers, jq --strict, other languages) refuse them.
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self._f.write(json.dumps(clean, allow_nan=False) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl in training order; a point logged twice (a resumed run re-doing
    the steps after its last checkpoint) keeps the later record.

    Records are keyed by `update`, the optimizer steps since the run began, which never goes back;
    `step` (the schedules' position) repeats after a resume with fewer steps per epoch, where both
    runs' records are real and are all kept. Records of an older lmim have only `step`: it keys them.
    """
    by_point: dict[int, dict[str, Any]] = {}
    extra: list[dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if not isinstance(rec, dict):
            continue
        point = rec.get("update", rec.get("step"))
        if isinstance(point, int) and not isinstance(point, bool):
            by_point[point] = {**by_point.get(point, {}), **rec}
        else:
            extra.append(rec)
    return [by_point[k] for k in sorted(by_point)] + extra


class CollapseGuard:
    """Watches one diagnostic; `update` returns "ok", "warn" (first crossing of an episode) or "stop".

    Args:
        threshold: collapse when the metric is above this (collapse_cos: ~1.0 = every image alike).
        patience: consecutive observations above the threshold before acting (noise is not collapse).
        after_step: observations before this step are ignored (a freshly initialised ViT maps
            every image to nearly the same vector; that is not collapse).
        action: "warn" or "stop".
    """

    def __init__(self, threshold: float, patience: int, after_step: int, action: str = "warn"):
        self.threshold, self.patience, self.after_step, self.action = threshold, max(1, patience), after_step, action
        self.count = 0
        self.warned = False

    def update(self, step: int, value: float) -> str:
        if step < self.after_step or not math.isfinite(value):
            return "ok"
        if value <= self.threshold:
            self.count, self.warned = 0, False
            return "ok"
        self.count += 1
        if self.count < self.patience:
            return "ok"
        if self.action == "stop":
            return "stop"
        if self.warned:
            return "ok"
        self.warned = True
        return "warn"


def flatten_for_tracker(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat {"optim.base_lr": 1.5e-4, ...} with only int/float/str/bool values
    (TensorBoard's hparams reject lists and None)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_for_tracker(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


_CURVES = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("momentum", "EMA momentum"),
    ("collapse_cos", "collapse cos (different images)"),
    ("effective_rank", "effective rank"),
    ("pred_token_sim", "token similarity (pred)"),
    ("images_per_s", "images / s"),
    ("data_wait_share", "data-wait share"),
    ("knn_top1", "k-NN top-1 %"),
)


def plot_curves(records: list[dict[str, Any]], path: str | Path) -> Path | None:
    """One PNG with a small panel per logged curve (those present in `records`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in _CURVES if any(k in r for r in records)]
    if not panels:
        return None
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r.get("update", r["step"]), r[key]) for r in records if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer steps", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_masks(
    images: torch.Tensor,
    visible: torch.Tensor,
    target: torch.Tensor,
    grid_size: int,
    mean: Iterable[float],
    std: Iterable[float],
    path: str | Path,
) -> Path:
    """A picture of a batch's masks: per image, the crop, what the online encoder sees (visible
    cells) and what it must predict (target cells). Cells are grid cells of the crop (with a patch
    gap the 16 px patch sits somewhere inside its 20 px cell).

    Args:
        images: [B, 3, H, W] normalised (CPU).
        visible, target: [B, K], [B, N-K] patch indices.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(8, images.shape[0])
    mean_t = torch.tensor(list(mean)).view(3, 1, 1)
    std_t = torch.tensor(list(std)).view(3, 1, 1)
    h = images.shape[-1]
    cell = h // grid_size
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.0), squeeze=False)
    for i in range(n):
        img = (images[i].float().cpu() * std_t + mean_t).clamp(0, 1)
        for row, (idx, title) in enumerate(((None, "image"), (visible[i], "visible"), (target[i], "target"))):
            shown = img.clone()
            if idx is not None:
                keep = torch.zeros(grid_size * grid_size, dtype=torch.bool)
                keep[idx.cpu()] = True
                cells = keep.view(grid_size, grid_size).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
                full = torch.zeros(h, h, dtype=torch.bool)
                full[: cells.shape[0], : cells.shape[1]] = cells
                shown = torch.where(full, shown, torch.full_like(shown, 0.5))
            ax = axes[row, i]
            ax.imshow(shown.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title, fontsize=9)
    fig.suptitle(f"masks: {visible.shape[1]} visible / {target.shape[1]} target patches of {grid_size}x{grid_size}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
