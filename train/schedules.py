"""Training schedules as pure functions of the optimizer step (the paper and its reference code).

Every value the loop needs at step `s` (learning rate, EMA momentum, regulariser target s*) is
computed from `s` alone, so a resumed run never replays or stores a scheduler: it only needs the
step counter. `s` counts optimizer steps from 0; a step's values are those used *by* that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["cosine", "lr_at", "ema_momentum_at", "sim_target_at", "Schedules"]


def cosine(step: float, total: float, start: float, end: float) -> float:
    """Half-cosine from `start` (step 0) to `end` (step `total`), constant `end` after."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(
    step: int,
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float = 0.25,
    final_factor: float = 0.25,
) -> float:
    """Linear warm-up from `warmup_start_factor * peak` to `peak`, then a half-cosine to `final_factor * peak`.

    Args:
        step: optimizer step (0-based).
        peak: the peak learning rate (base lr x effective batch / 256).
        total_steps: steps of the whole schedule (epochs x steps per epoch).
        warmup_steps: steps of the linear warm-up (warm-up epochs x steps per epoch).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps)
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final_factor * peak)


def ema_momentum_at(step: int, *, total_steps: int, start: float = 0.99, end: float = 1.0) -> float:
    """Target-encoder momentum: cosine from `start` to `end` over all steps (per step = fractional epoch)."""
    return cosine(step, total_steps, start, end)


def sim_target_at(step: int, *, total_steps: int, start: float = 0.75, end: float = 0.25) -> float:
    """Similarity-regulariser target s*: cosine from `start` to `end`."""
    return cosine(step, total_steps, start, end)


@dataclass(frozen=True)
class Schedules:
    """The three schedules bound to one run's lengths; call `at(step)` for the values of a step."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    warmup_start_factor: float = 0.25
    final_factor: float = 0.25
    ema_start: float = 0.99
    ema_end: float = 1.0
    sim_start: float = 0.75
    sim_end: float = 0.25

    @classmethod
    def from_config(cls, cfg, steps_per_epoch: int, effective_batch: int) -> "Schedules":
        """Bind a TrainConfig: peak lr = optim.lr, or optim.base_lr x effective_batch / 256."""
        o = cfg.optim
        peak = float(o.lr) if o.lr is not None else float(o.base_lr) * effective_batch / 256.0
        return cls(
            peak_lr=peak,
            total_steps=int(cfg.epochs) * steps_per_epoch,
            warmup_steps=int(round(float(o.warmup_epochs) * steps_per_epoch)),
            warmup_start_factor=float(o.warmup_start_factor),
            final_factor=float(o.final_factor),
            ema_start=float(cfg.ema.start),
            ema_end=float(cfg.ema.end),
            sim_start=float(cfg.sim_reg.start),
            sim_end=float(cfg.sim_reg.end),
        )

    def lr(self, step: int) -> float:
        return lr_at(
            step,
            peak=self.peak_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            warmup_start_factor=self.warmup_start_factor,
            final_factor=self.final_factor,
        )

    def momentum(self, step: int) -> float:
        return ema_momentum_at(step, total_steps=self.total_steps, start=self.ema_start, end=self.ema_end)

    def sim_target(self, step: int) -> float:
        return sim_target_at(step, total_steps=self.total_steps, start=self.sim_start, end=self.sim_end)

    def at(self, step: int) -> dict[str, float]:
        return {"lr": self.lr(step), "momentum": self.momentum(step), "sim_target": self.sim_target(step)}
