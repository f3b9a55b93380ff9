"""Where a training run's numbers go, and the checks made on them.

Every logged window goes to Accelerate's trackers (TensorBoard / W&B), to `metrics.jsonl`
(process 0) and to the progress bar (on a terminal; a plain line per window when stderr is a log
file, so a batch job's log is not a wall of redrawn bars); two checks run on it: a non-finite loss stops the run
before its weights can be checkpointed, and the collapse guard warns (or stops). k-NN results,
the per-rank debug log and the end-of-run plots go through here too, so the loop itself only
says *when* (`lmim.train.cadence`).
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from lmim.pipeline.batch import Batch
from lmim.train.checkpoint import TrainState
from lmim.train.failures import TrainingError
from lmim.train.meter import Meter
from lmim.train.observe import CollapseGuard, MetricsWriter, flatten_for_tracker, plot_curves, plot_masks, read_metrics
from lmim.train.schedules import Schedules

__all__ = ["Reporter"]


class Reporter:
    """The run's outputs: trackers, metrics.jsonl, progress bar, debug rank log, plots.

    Args:
        cfg: the run's TrainConfig.
        accelerator: the run's Accelerator (trackers, cross-process reduction, printing).
        schedules: the values logged with each window (those of the window's last step).
        steps_per_epoch: for the logged `epoch` and the collapse guard's start.
        loader: the training loader (its skip counts are logged with each window).
        start_step, stop_step: the progress bar's range.
    """

    def __init__(self, cfg: DictConfig, accelerator, *, schedules: Schedules, steps_per_epoch: int, loader,
                 start_step: int, stop_step: int):
        self.cfg, self.accelerator, self.schedules = cfg, accelerator, schedules
        self.steps_per_epoch, self.loader = steps_per_epoch, loader
        run_dir = Path(cfg.run_dir)
        is_main = accelerator.is_main_process
        accelerator.init_trackers(cfg.name, config=flatten_for_tracker(OmegaConf.to_container(cfg, resolve=True)))
        self.metrics_log = MetricsWriter(run_dir / "metrics.jsonl", enabled=is_main)
        self.rank_log = None
        if cfg.debug_rank_log:
            self.rank_log = MetricsWriter(run_dir / "debug" / f"rank{accelerator.process_index}.jsonl")
        guard = cfg.collapse_guard
        self.guard = CollapseGuard(guard.threshold, guard.patience, after_step=int(guard.after_epochs * steps_per_epoch),
                                   action=guard.action)
        self.progress = None
        self.progress_lines = False   # a plain line per logged window instead of the bar
        self.stop_step = stop_step
        if is_main and cfg.progress:
            if sys.stderr.isatty():
                from tqdm.auto import tqdm

                self.progress = tqdm(total=stop_step, initial=start_step, unit="step", dynamic_ncols=True,
                                     desc="pretrain")
            else:
                self.progress_lines = True
        self.last: dict[str, float] = {}   # the last logged record
        self.sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # for the masks plot

    # ------------------------------------------------------------------------------------ per batch
    def watch(self, batches: Iterator[Batch], state: TrainState) -> Iterator[Batch]:
        """`batches`, unchanged: keeps a few images and masks of the first (process 0) for the masks
        plot, and logs each micro-batch's keys (and the step it belongs to) to the debug rank log."""
        keep_sample = self.accelerator.is_main_process
        for micro_step, batch in enumerate(batches, start=state.micro_step):
            if self.sample is None and keep_sample:
                self.sample = (batch.images[:8].detach().cpu(), batch.visible[:8].cpu(), batch.target[:8].cpu())
            if self.rank_log is not None:
                self.rank_log.write({"micro_step": micro_step, "step": state.step, "keys": batch.keys})
            yield batch

    # ------------------------------------------------------------------------------------- per step
    def step_done(self, step: int, net: torch.nn.Module) -> None:
        """After each optimizer step: the progress bar, and `net`'s digest in the debug rank log."""
        if self.rank_log is not None:
            self.rank_log.write({"step": step, "digest": _param_digest(net)})
        if self.progress is not None:
            self.progress.update(1)

    def window(self, meter: Meter, state: TrainState, last_checkpoint: Path | None) -> None:
        """Close `meter`'s window (averaged over processes) and log it, unless it is empty.

        Each record carries `step` (the schedules' position, which a resume with another number of
        steps per epoch moves back) and `update` (optimizer steps since the run began, which never
        goes back): trackers and plots use `update`, because W&B drops every point logged at a step
        below its last one and TensorBoard draws a step axis that goes back as a scribble.

        Raises:
            TrainingError: a loss in the window was non-finite, or the collapse guard says stop.
        """
        acc = self.accelerator
        step = state.step
        w = meter.window(lambda t: acc.reduce(t.to(acc.device), reduction="sum") / acc.num_processes)
        if w is None:
            return
        if w.nonfinite:
            first = step - w.steps + 1
            when = f"at step {step}" if first == step else f"between steps {first} and {step}"
            lr_key = "optim.lr" if self.cfg.optim.lr is not None else "optim.base_lr"
            if last_checkpoint:
                then = (f"the last good checkpoint is kept ({last_checkpoint}); resume from it with resume=auto, "
                        f"perhaps with a lower {lr_key} or precision=no.")
            else:
                then = f"no checkpoint was written yet: start again with a lower {lr_key} or precision=no."
            raise TrainingError(f"The loss became non-finite (nan/inf) {when}; training stopped and {then}")
        record = {
            "step": step,
            "update": state.updates,
            "images_seen": state.images_seen,
            "epoch": getattr(self.loader, "epochs_done", step / self.steps_per_epoch),
            "loss": w.loss,
            **w.metrics,
            **self.schedules.at(step - 1),
            "images_per_s": w.images_per_s,
            "data_wait_share": w.data_wait_share,
            **_data_counts(self.loader),
            **self._source_counts(),
        }
        acc.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "update")}, step=state.updates)
        self.metrics_log.write(record)
        self.last = record
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}",
                                      wait=f"{record['data_wait_share']:.0%}", refresh=False)
        if self.progress_lines:
            print(progress_line(step, self.stop_step, record), flush=True)
        self._check_collapse(state, record, last_checkpoint)

    def _source_counts(self) -> dict[str, int]:
        """Training on a mixture (data.sources): the samples every process together took from each
        source over the run, `data_samples/<source name>` (a collective: every process logs)."""
        if getattr(self.loader, "mix", None) is None:
            return {}
        per_process = self.loader.stats["source_samples"]
        acc = self.accelerator
        total = acc.reduce(torch.tensor(list(per_process.values()), dtype=torch.int64, device=acc.device),
                           reduction="sum")
        return {f"data_samples/{name}": int(n) for name, n in zip(per_process, total.tolist())}

    def _check_collapse(self, state: TrainState, record: dict[str, float], last_checkpoint: Path | None) -> None:
        cfg = self.cfg.collapse_guard
        step = state.step
        verdict = self.guard.update(step, float(record.get(cfg.metric, float("nan"))))
        if verdict == "ok":
            return
        msg = (
            f"COLLAPSE WARNING at step {step}: {cfg.metric} = {record.get(cfg.metric):.4f} > {cfg.threshold} for "
            f"{self.guard.count} logged steps: the encoder maps different images to nearly the same vector."
        )
        self.accelerator.print("\n" + "!" * 100 + f"\n{msg}\n" + "!" * 100)
        self.metrics_log.write({"event": "collapse_warning", "step": step, "update": state.updates, "message": msg})
        if verdict == "stop":
            kept = f"the last checkpoint is kept ({last_checkpoint})" if last_checkpoint else "no checkpoint was written yet"
            raise TrainingError(f"{msg} Stopped (collapse_guard.action=stop); {kept}.")

    def evaluation(self, state: TrainState, result: dict[str, float]) -> None:
        """A k-NN result ({"knn_top1": %}), at `state`'s step and update (as `window`'s records)."""
        step = state.step
        self.accelerator.log({"eval/knn_top1": result["knn_top1"]}, step=state.updates)
        self.metrics_log.write({"step": step, "update": state.updates, **result})
        self.accelerator.print(f"step {step}: k-NN top-1 {result['knn_top1']:.2f}% ({knn_metric_name(self.cfg)})")

    # ------------------------------------------------------------------------------------ at the end
    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.metrics_log.close()
        if self.rank_log is not None:
            self.rank_log.close()

    def plot(self) -> None:
        """The curves of metrics.jsonl and the first batch's masks, as PNGs under run_dir/plots (process 0)."""
        if not self.accelerator.is_main_process:
            return
        run_dir = Path(self.cfg.run_dir)
        records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
        plot_curves(records, run_dir / "plots" / "curves.png")
        if self.sample is not None:
            d = self.cfg.data
            plot_masks(*self.sample, self.cfg.model.grid_size, d.mean, d.std, run_dir / "plots" / "masks.png")


def progress_line(step: int, stop_step: int, record: dict[str, float]) -> str:
    """One logged window as a line of a log file: `step 40/460 (9%): loss 1.2333, 734 img/s, data wait 5%`."""
    return (f"step {step}/{stop_step} ({step / max(stop_step, 1):.0%}): loss {record['loss']:.4f}, "
            f"{record['images_per_s']:.0f} img/s, data wait {record['data_wait_share']:.0%}")


def knn_metric_name(cfg: DictConfig) -> str:
    """Which k-NN the trainer's evaluation computes (pretrain.knn_evaluate), for the printed line: the
    two differ by several points on the same encoder, so a bare "k-NN top-1" invites comparing them."""
    if cfg.eval.knn_train_url:
        return f"weighted {cfg.eval.knn_k}-NN on data.eval_url, eval.knn_train_url as memory"
    return "leave-one-out 1-NN within data.eval_url"


def _param_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (online and target): equal digests = identical weights."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _data_counts(loader) -> dict[str, int]:
    """How much data this process skipped so far (data.on_error=skip), for the metrics log."""
    stats = getattr(loader, "stats", None)
    if not isinstance(stats, dict):
        return {}
    return {"data_skipped_samples": int(stats.get("skipped", 0)), "data_skipped_shards": len(stats.get("skipped_shards", []))}
