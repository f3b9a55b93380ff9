"""When the training loop logs, evaluates, checkpoints and stops: pure functions of the step.

`step` here is a count of finished optimizer steps (the loop asks after step `s` finished with
`s + 1`). The last step always logs, evaluates (when a labelled split is configured) and
checkpoints, whatever the intervals, so a run's final state is always measured and saved.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cadence"]


@dataclass(frozen=True)
class Cadence:
    """The loop's intervals, in optimizer steps.

    Attributes:
        stop_step: the step the run stops at (max_steps, or the whole schedule).
        log_every: steps between logged windows.
        knn: a labelled split is configured (data.eval_url), so k-NN monitoring runs.
        knn_every: steps between k-NN evaluations; 0 = only at the end.
        checkpoint_every: steps between checkpoints; 0 = only at the end.
    """

    stop_step: int
    log_every: int
    knn: bool
    knn_every: int
    checkpoint_every: int

    @classmethod
    def from_config(cls, cfg, steps_per_epoch: int, total_steps: int) -> "Cadence":
        """Bind a TrainConfig to a run's lengths (`Schedules.total_steps`)."""
        return cls(
            stop_step=total_steps if cfg.max_steps is None else min(total_steps, int(cfg.max_steps)),
            log_every=int(cfg.log_every),
            knn=bool(cfg.data.eval_url),
            knn_every=cfg.eval.knn_every_epochs * steps_per_epoch,
            checkpoint_every=int(cfg.checkpoint.every_steps),
        )

    def done(self, step: int) -> bool:
        return step >= self.stop_step

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or self.done(step)

    def evaluates(self, step: int) -> bool:
        return self.knn and (_every(step, self.knn_every) or self.done(step))

    def checkpoints(self, step: int) -> bool:
        return _every(step, self.checkpoint_every) or self.done(step)

    def records(self, step: int) -> bool:
        """A metrics record, diagnostics included, closes the window at this step: each logged step,
        and each evaluation or checkpoint step too (a non-finite loss must stop the run before its
        weights are evaluated or saved)."""
        return self.logs(step) or self.evaluates(step) or self.checkpoints(step)


def _every(step: int, interval: int) -> bool:
    return bool(interval) and step % interval == 0
