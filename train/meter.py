"""What the training loop measures: data wait, images/s and metric averages per logging window,
and the steady-state timing of the whole invocation.

The loop hands the meter its batches (`timed`) and each finished step's outputs (`add_step`);
at a log step it closes the window (`window`) and gets the averages back, reduced over
processes. Nothing here decides *when* to log (`lmim.train.cadence`) or where it goes.
"""
from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import Callable, Iterable, Iterator, TypeVar

import torch

__all__ = ["Meter", "Window"]

T = TypeVar("T")

# Whole-run timing skips this many steps after the start (start-up, allocator warm-up, compilation).
WARMUP_STEPS = 3


@dataclass(frozen=True)
class Window:
    """One logging window, averaged over its steps and over processes.

    Attributes:
        steps: optimizer steps in the window (this process's count; every process has the same).
        loss: mean of the steps' losses.
        metrics: every other model output (sorted by name), mean over the window's micro-batches.
        nonfinite: some step's loss was nan or inf on some process.
        images_per_s: images of all processes over the window's wall time.
        data_wait_share: share of the window's wall time this process spent blocked on its loader.
    """

    steps: int
    loss: float
    metrics: dict[str, float]
    nonfinite: bool
    images_per_s: float
    data_wait_share: float


class Meter:
    """Windowed timing and metric averages of the loop, and the whole run's steady-state timing.

    Args:
        images_per_step: images of one optimizer step over all processes (the effective batch).
        start_step: the step this invocation starts at (0, or the resumed step).
        stop_step: the step it stops at; whole-run timing ends there, before the last
            evaluation and checkpoint.
    """

    def __init__(self, images_per_step: int, start_step: int, stop_step: int):
        self.images_per_step, self.stop_step = images_per_step, stop_step
        self.timing_from = start_step + min(WARMUP_STEPS, max(0, stop_step - start_step - 1))
        self._run_start = perf_counter() if start_step >= self.timing_from else None
        self._run_end: float | None = None
        self._run_wait = 0.0
        self._open_window()

    def _open_window(self) -> None:
        self._t0 = perf_counter()
        self._wait = 0.0
        self._images = 0
        self._losses: list[torch.Tensor] = []                 # one per optimizer step
        self._metrics: dict[str, list[torch.Tensor]] = {}     # one per micro-batch

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """`batches` (one epoch), counting the time each batch kept the loop waiting. Starting the
        epoch and noticing its end are not counted, only fetching batches."""
        it = iter(batches)
        while True:
            t = perf_counter()
            batch = next(it, None)
            if batch is None:
                return
            waited = perf_counter() - t
            self._wait += waited
            if self._run_start is not None:
                self._run_wait += waited
            yield batch

    def add_step(self, outs: list[dict[str, torch.Tensor]], step: int) -> None:
        """Record a finished optimizer step: its micro-batches' outputs (`train_step`'s) and the
        step count after it."""
        for out in outs:
            for name, value in out.items():
                self._metrics.setdefault(name, []).append(value.detach().float())
        self._losses.append(torch.stack(self._metrics.pop("loss")).mean())
        self._images += self.images_per_step
        if step == self.timing_from:
            self._run_start = perf_counter()
        if step >= self.stop_step:
            self._run_end = perf_counter()

    def window(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Window | None:
        """Close the current window and open the next; None when no step was taken in it.

        Args:
            reduce: a 1-D tensor -> its mean over processes (a collective: every process calls
                `window` at the same steps).
        """
        if not self._losses:
            return None
        names = sorted(self._metrics)
        losses = torch.stack(self._losses)
        local = torch.stack(
            [losses.mean()]
            + [torch.stack(self._metrics[n]).mean() for n in names]
            + [(~torch.isfinite(losses)).sum().float()]
        ).float()
        values = reduce(local).tolist()
        elapsed = max(perf_counter() - self._t0, 1e-9)
        window = Window(
            steps=len(self._losses),
            loss=values[0],
            metrics=dict(zip(names, values[1:-1])),
            nonfinite=values[-1] > 0,
            images_per_s=self._images / elapsed,
            data_wait_share=self._wait / elapsed,
        )
        self._open_window()
        return window

    def summary(self, step: int) -> dict[str, float] | None:
        """Steady-state figures of this invocation up to its last step (steps/s, images/s, the share of
        wall time blocked on the loader); None when it was too short to time."""
        steps = step - self.timing_from
        if self._run_start is None or self._run_end is None or steps <= 0:
            return None
        wall = max(self._run_end - self._run_start, 1e-9)
        return {
            "steps": steps,
            "wall_s": wall,
            "steps_per_s": steps / wall,
            "images_per_s": steps * self.images_per_step / wall,
            "data_wait_share": self._run_wait / wall,
        }
