"""Pretrain Latent MIM with Accelerate: one code path from a CPU laptop to many GPU nodes.

Launch (every form takes `--config PRESET_OR_FILE` and any number of `key=value` overrides):

    # one process: CPU, or one GPU when there is one
    lmim pretrain --config quickstart
    python -m lmim.train.pretrain --config quickstart epochs=2

    # one GPU
    accelerate launch -m lmim.train.pretrain --config vit_b16_in1k data.url=s3://bucket/in1k-train

    # one node, 8 GPUs (effective batch 256 x 8 x 2 = 4096, the reference)
    accelerate launch --multi_gpu --num_processes 8 -m lmim.train.pretrain --config vit_b16_in1k \
        grad_accum=2 data.url=s3://bucket/in1k-train data.eval_url=s3://bucket/in1k-val

    # 4 nodes x 8 GPUs: run on every node, MACHINE_RANK = 0..3, MAIN_HOST = node 0's address
    accelerate launch --multi_gpu --num_machines 4 --num_processes 32 --machine_rank $MACHINE_RANK \
        --main_process_ip $MAIN_HOST --main_process_port 29500 \
        -m lmim.train.pretrain --config vit_b16_in1k data.url=s3://bucket/in1k-train run_dir=/shared/runs/b16

    # continue a run after a crash / preemption (newest complete checkpoint; fresh if none)
    ... -m lmim.train.pretrain --config vit_b16_in1k resume=auto        (or: --resume auto)

    # CPU, 2 processes (gloo), as the tests do
    torchrun --nproc_per_node 2 -m lmim.train.pretrain --config quickstart device=cpu

`docs/TRAINING.md` explains each and `scripts/slurm_pretrain.sh` launches several nodes on SLURM.

The loop follows Accelerate's complete_cv_example: prepare -> load_state -> loop -> save_state
-> log(step=) -> end_training. A "step" is one optimizer step (grad_accum micro-batches on every
process); schedules are pure functions of it (train/schedules.py), so resuming needs only the
step, the model/optimizer/scaler, the loader position and the RNG states, all in the checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lmim.train.checkpoint import (
    CheckpointError,
    RankedState,
    TrainState,
    install_unwrapped_model_hooks,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_incomplete,
    save_checkpoint,
)
from lmim.train.config import ConfigError, effective_batch_size, load_config, preset_names, save_config, to_yaml
from lmim.train.failures import Failure, TrainingError, classify
from lmim.train.hardware import ThreadBudget, plan_threads, process_cores, resolve_precision
from lmim.train.observe import CollapseGuard, MetricsWriter, flatten_for_tracker, plot_curves, plot_masks, read_metrics
from lmim.train.schedules import Schedules

__all__ = ["main", "run", "TrainingError", "make_loader", "parse_args", "reset_accelerate_state"]


# ---------------------------------------------------------------------------------------------- setup
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lmim pretrain",
        description="Pretrain Latent MIM. Multi-GPU / multi-node: `accelerate launch -m lmim.train.pretrain ...` "
        "with the same arguments (see docs/TRAINING.md).",
    )
    p.add_argument("--config", default=None, help=f"preset ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in run_dir) or a checkpoint folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true",
                   help="also print the traceback of a failure (LMIM_DEBUG=1 does the same; it is always in run_dir/logs/error.log)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.base_lr=3e-4 data.url=s3://b/p")
    return p.parse_args(argv)


def _resolve_resume(cfg: DictConfig) -> Path | None:
    """Which checkpoint to start from. A fresh run into a folder that already holds checkpoints is
    refused, rather than silently mixing two runs' checkpoints and logs."""
    run_dir = Path(cfg.run_dir)
    if cfg.resume in (None, "", "none", "never"):
        found = list_checkpoints(run_dir)
        if found:
            raise ConfigError(
                f"run_dir {str(run_dir)!r} already holds checkpoints (newest: {found[-1][1].name}); "
                "add resume=auto to continue that run, or choose another run_dir."
            )
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(cfg.resume)
    from lmim.train.checkpoint import is_complete

    if not is_complete(path):
        raise ConfigError(f"resume={cfg.resume!r} is not a complete checkpoint folder (step_* with complete.json).")
    return path


def make_loader(cfg: DictConfig, accelerator, *, train: bool = True, url: str | None = None, batch_size: int | None = None):
    """The data loader of this process (`pipeline.build_loader`, or the synthetic device-resident one)."""
    m, d = cfg.model, cfg.data
    if d.loader == "synthetic":
        from lmim.train.synthetic import SyntheticLoader

        gap = m.patch_gap if train else 0
        return SyntheticLoader(
            batch_size=batch_size or d.batch_size,
            image_size=m.grid_size * (m.patch_size + gap),
            grid_size=m.grid_size,
            num_visible=d.num_visible,
            mask=d.mask,
            batches_per_epoch=int(cfg.synthetic_batches),
            device=accelerator.device,
            seed=cfg.seed,
            rank=accelerator.process_index,
        )
    from lmim.pipeline import build_loader

    data_cfg = OmegaConf.to_object(d)
    data_cfg.num_threads = thread_budget(cfg, accelerator).loader_threads
    if batch_size is not None:
        data_cfg.batch_size = batch_size
    return build_loader(
        data_cfg,
        grid_size=m.grid_size,
        patch_size=m.patch_size,
        patch_gap=m.patch_gap,
        train=train,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        device=accelerator.device,
        seed=cfg.seed,
        url=url,
    )


def thread_budget(cfg: DictConfig, accelerator) -> ThreadBudget:
    """Torch and loader threads for this process's share of the machine (cgroup quota and local ranks included)."""
    plan = plan_threads(process_cores(), int(cfg.data.num_threads), model_on_cpu=accelerator.device.type == "cpu")
    if cfg.threads is not None:  # the user's torch thread count wins; the loader keeps its share
        plan = dataclasses.replace(plan, torch_threads=int(cfg.threads),
                                   reason=plan.reason.split(":")[0] + f": threads={cfg.threads} for the model as configured, "
                                   f"{plan.loader_threads} for the loader")
    return plan


def _prepare_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete(run_dir)  # leftovers of a write that was interrupted; never resumed from
        save_config(cfg, run_dir / "config.yaml")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise
        raise ConfigError(f"run_dir {str(run_dir)!r} cannot be written ({err.strerror or err}): "
                          "choose a writable folder with run_dir=PATH.") from None


def _skip_counts(loader) -> dict[str, int]:
    """How much data this process skipped so far (data.on_error=skip), for the metrics log."""
    stats = getattr(loader, "stats", None)
    if not isinstance(stats, dict):
        return {}
    return {"data_skipped_samples": int(stats.get("skipped", 0)), "data_skipped_shards": len(stats.get("skipped_shards", []))}


def _write_status(run_dir: Path, status: str, step: int, failure: Failure | None, checkpoint: Path | None) -> None:
    """status.json, replaced atomically: a reader sees the old status or the new one, never a torn file.

    {"status": running|completed|failed|interrupted, "step", "last_checkpoint", and on failure
    "kind" (config|data|storage|disk|checkpoint|diverged|interrupted|bug), "message", "exit_code"}.
    """
    record: dict[str, Any] = {"status": status, "step": step, "last_checkpoint": str(checkpoint) if checkpoint else None}
    if failure is not None:
        record.update(kind=failure.kind, message=failure.sentence, exit_code=failure.code)
    tmp = run_dir / f".status.json.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, run_dir / "status.json")
    except OSError:  # e.g. the disk is full: keep the previous status rather than a truncated one
        tmp.unlink(missing_ok=True)


def _load_resume(cfg: DictConfig, accelerator, first: Path, states: dict[str, Any]) -> Path:
    """Load `first`; with resume=auto, fall back to older complete checkpoints when it is damaged.

    Raises:
        CheckpointError: no candidate could be loaded (one sentence naming the newest's problem).
    """
    candidates = [first]
    if cfg.resume == "auto":
        candidates += [p for _, p in reversed(list_checkpoints(cfg.run_dir)) if p != first]
    errors: list[CheckpointError] = []
    for path in candidates:
        try:
            load_checkpoint(accelerator, path, states)
            return path
        except CheckpointError as err:
            errors.append(err)
            if path is not candidates[-1]:
                accelerator.print(f"warning: {err} Trying the previous checkpoint.")
    if len(errors) == 1:
        raise errors[0]
    raise CheckpointError(f"none of the {len(errors)} checkpoints in {cfg.run_dir} can be loaded; the newest: {errors[0]}")


def _make_accelerator(cfg: DictConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto.")
    cpu = cfg.device == "cpu" or not cuda
    if cpu and cfg.precision == "fp16":
        raise ConfigError("precision=fp16 needs a GPU; on the CPU use precision=auto, bf16 or no.")
    precision = resolve_precision(cfg.precision, on_cuda=not cpu)
    log_with = list(cfg.log_with)
    if "wandb" in log_with:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("log_with includes 'wandb' but wandb is not installed; `pip install wandb` or drop it.")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision.precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=cfg.run_dir, logging_dir=str(Path(cfg.run_dir) / "logs")),
        # Frozen position embeddings and the EMA target have requires_grad=False, so DDP never
        # waits for them; every trainable parameter is used in each forward pass.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    return accelerator, precision


def _param_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (online and target): equal digests = identical weights."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so that another `run` in the same process (a
    benchmark's or a test's) starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---------------------------------------------------------------------------------------------- eval
def knn_evaluate(cfg: DictConfig, accelerator, encoder: torch.nn.Module) -> dict[str, float]:
    """k-NN top-1 of `encoder` on data.eval_url: weighted k-NN against eval.knn_train_url when set,
    else the paper's leave-one-out 1-NN on the eval split alone."""
    from lmim.train.evaluate.features import extract_features
    from lmim.train.evaluate.knn import knn_loo1, knn_weighted

    was_training = encoder.training
    encoder.eval()
    try:
        loader = make_loader(cfg, accelerator, train=False, url=cfg.data.eval_url, batch_size=cfg.eval.batch_size)
        try:
            feats, labels = extract_features(encoder, loader, device=accelerator.device)
        finally:
            loader.close()
        if cfg.eval.knn_train_url:
            bank = make_loader(cfg, accelerator, train=False, url=cfg.eval.knn_train_url, batch_size=cfg.eval.batch_size)
            try:
                bank_feats, bank_labels = extract_features(encoder, bank, device=accelerator.device)
            finally:
                bank.close()
            return {"knn_top1": knn_weighted(bank_feats, bank_labels, feats, labels, k=cfg.eval.knn_k, T=cfg.eval.knn_t)}
        return {"knn_top1": knn_loo1(feats, labels)}
    finally:
        encoder.train(was_training)


# ---------------------------------------------------------------------------------------------- loop
def run(cfg: DictConfig) -> dict[str, Any]:
    """Train per `cfg` (a resolved TrainConfig); returns a summary (paths, last metrics, timings).

    Raises:
        ConfigError: a bad setting found at start-up (one sentence).
        TrainingError: non-finite loss, or collapse with collapse_guard.action=stop.
    """
    from accelerate.utils import set_seed

    from lmim.model import LatentMIM

    accelerator, precision = _make_accelerator(cfg)
    is_main = accelerator.is_main_process
    if precision.warning:
        accelerator.print(f"warning: {precision.warning}")
    accelerator.print(precision.reason)
    threads = thread_budget(cfg, accelerator)
    torch.set_num_threads(threads.torch_threads)
    accelerator.print(f"threads: {threads.reason}")
    run_dir = Path(cfg.run_dir)
    resume_from = _resolve_resume(cfg)
    config_yaml = to_yaml(cfg)

    # The same seed on every process for the initial weights (DDP also broadcasts rank 0's), then a
    # per-process seed for everything random during training (patch-gap jitter, ...).
    set_seed(cfg.seed)
    model = LatentMIM(OmegaConf.to_object(cfg.model))
    set_seed(cfg.seed, device_specific=True)

    loader = make_loader(cfg, accelerator, train=True)
    micro_per_epoch = len(loader)
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"The dataset gives {micro_per_epoch} batches per process per epoch, fewer than grad_accum={cfg.grad_accum}; "
            "lower data.batch_size or grad_accum."
        )
    # Only now, with the data readable, does the run folder get written: a start that fails on its
    # data or config leaves nothing behind (no config.yaml that looks like a run).
    if is_main:
        _prepare_run_dir(cfg, run_dir)
    accelerator.wait_for_everyone()
    eff_batch = effective_batch_size(cfg, accelerator.num_processes)
    sched = Schedules.from_config(cfg, steps_per_epoch, eff_batch)
    stop_step = sched.total_steps if cfg.max_steps is None else min(sched.total_steps, int(cfg.max_steps))

    opt = cfg.optim
    fused = accelerator.device.type == "cuda"  # one kernel for the whole update: less trainer overhead
    optimizer = torch.optim.AdamW(
        model.param_groups(opt.weight_decay), lr=sched.lr(0), betas=tuple(opt.betas), eps=opt.eps, fused=fused
    )
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)  # LatentMIM itself: update_target, .encoder for k-NN

    state = TrainState(world_size=accelerator.num_processes)
    install_unwrapped_model_hooks(accelerator)
    # Saved as JSON next to the weights (never pickled), in this order (see lmim.train.checkpoint).
    saved_states = {"trainer_state": state,
                    "loader_state": RankedState(loader, accelerator.process_index, accelerator.num_processes)}
    resumed = None
    if resume_from is not None:
        resumed = _load_resume(cfg, accelerator, resume_from, saved_states)
        accelerator.print(f"resumed from {resumed} at step {state.step}")

    accelerator.init_trackers(cfg.name, config=flatten_for_tracker(OmegaConf.to_container(cfg, resolve=True)))
    metrics_log = MetricsWriter(run_dir / "metrics.jsonl", enabled=is_main)
    rank_log = None
    if cfg.debug_rank_log:
        rank_log = MetricsWriter(run_dir / "debug" / f"rank{accelerator.process_index}.jsonl")
    guard = CollapseGuard(
        cfg.collapse_guard.threshold,
        cfg.collapse_guard.patience,
        after_step=int(cfg.collapse_guard.after_epochs * steps_per_epoch),
        action=cfg.collapse_guard.action,
    )
    # k-NN monitoring (needs a labelled split): every knn_every_epochs epochs, and at the end.
    knn_on = bool(cfg.data.eval_url)
    knn_every = cfg.eval.knn_every_epochs * steps_per_epoch

    progress = None
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=stop_step, initial=state.step, unit="step", dynamic_ncols=True, desc="pretrain")

    # Timing over a logging window: wall time, time blocked on the loader, images.
    window = {"t0": time.perf_counter(), "wait": 0.0, "images": 0}
    # Whole-run timing skips the first few steps (start-up, allocator warm-up, compilation) and
    # stops before the final evaluation/checkpoint.
    timing_from = state.step + min(3, max(0, stop_step - state.step - 1))
    totals = {"wait": 0.0, "t_start": time.perf_counter() if state.step >= timing_from else None, "t_end": None}
    step_losses: list[torch.Tensor] = []   # per optimizer step, since the last log (checked for NaN there)
    micro_metrics: dict[str, list[torch.Tensor]] = {}
    sample_batch = None
    last_logged: dict[str, float] = {}
    last_ckpt = latest_checkpoint(run_dir) if resume_from is not None else None
    model.train()

    def log_window(force_check: bool = False) -> None:
        """Reduce the window's metrics over processes, stop on a non-finite loss, log, guard."""
        nonlocal step_losses, micro_metrics, last_logged
        if not step_losses:
            return
        names = sorted(micro_metrics)
        local = torch.stack(
            [torch.stack(step_losses).mean()]
            + [torch.stack(micro_metrics[n]).mean() for n in names]
            + [(~torch.isfinite(torch.stack(step_losses))).sum().float()]
        ).float()
        reduced = accelerator.reduce(local.to(accelerator.device), reduction="sum") / accelerator.num_processes
        values = reduced.tolist()
        bad = values[-1] > 0
        if bad:
            first = state.step - len(step_losses) + 1
            where = f"a checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint yet"
            raise TrainingError(
                f"The loss became non-finite (nan/inf) between steps {first} and {state.step}; training stopped "
                f"and the last good checkpoint is kept ({where}); resume from it with resume=auto, "
                "perhaps with a lower optim.base_lr or precision=no."
            )
        now = time.perf_counter()
        elapsed = max(now - window["t0"], 1e-9)
        record = {
            "step": state.step,
            "epoch": state.step / steps_per_epoch,
            "loss": values[0],
            **{n: v for n, v in zip(names, values[1:-1])},
            **sched.at(state.step - 1),
            "images_per_s": window["images"] / elapsed,
            "data_wait_share": window["wait"] / elapsed,
            **_skip_counts(loader),
        }
        accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
        metrics_log.write(record)
        last_logged = record
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}",
                                 wait=f"{record['data_wait_share']:.0%}", refresh=False)
        verdict = guard.update(state.step, float(record.get(cfg.collapse_guard.metric, float("nan"))))
        if verdict != "ok":
            msg = (
                f"COLLAPSE WARNING at step {state.step}: {cfg.collapse_guard.metric} = "
                f"{record.get(cfg.collapse_guard.metric):.4f} > {cfg.collapse_guard.threshold} for "
                f"{guard.count} logged steps: the encoder maps different images to nearly the same vector."
            )
            accelerator.print("\n" + "!" * 100 + f"\n{msg}\n" + "!" * 100)
            metrics_log.write({"event": "collapse_warning", "step": state.step, "message": msg})
            if verdict == "stop":
                raise TrainingError(msg + " Stopped (collapse_guard.action=stop); the last checkpoint is kept.")
        step_losses, micro_metrics = [], {}
        window.update(t0=time.perf_counter(), wait=0.0, images=0)

    status, failure = "completed", None
    if is_main:
        _write_status(run_dir, "running", state.step, None, resumed)
    try:
        done = state.step >= stop_step
        while not done:
            batches = iter(loader)
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                waited = time.perf_counter() - t_wait
                if batch is None:
                    break  # epoch over; the loader advanced its epoch
                window["wait"] += waited
                if totals["t_start"] is not None:
                    totals["wait"] += waited
                if sample_batch is None and is_main:
                    sample_batch = (batch.images[:8].detach().cpu(), batch.visible[:8].cpu(), batch.target[:8].cpu())
                if rank_log is not None:
                    rank_log.write({"micro_step": state.micro_step, "step": state.step, "keys": batch.keys})

                # The lr of the optimizer step this micro-batch belongs to (pure function of the step).
                for group in optimizer.param_groups:
                    group["lr"] = sched.lr(state.step)
                sim_target = sched.sim_target(state.step) if net.cfg.sim_reg_coef > 0 else None
                # The diagnostics (an SVD that syncs a GPU, token similarities) only for the step
                # that will be logged; every other step computes just the loss.
                logged = (state.step + 1) % cfg.log_every == 0 or state.step + 1 >= stop_step
                with accelerator.accumulate(model):
                    out = model(batch.images, batch.visible, batch.target, sim_target=sim_target, metrics=logged)
                    accelerator.backward(out["loss"])
                    if accelerator.sync_gradients and opt.clip_grad > 0:
                        accelerator.clip_grad_norm_(model.parameters(), opt.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.micro_step += 1
                for k, v in out.items():
                    micro_metrics.setdefault(k, []).append(v.detach().float())
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step is complete on every process
                net.update_target(sched.momentum(state.step))  # once per optimizer step, after the update
                # This step's micro-batch losses (the list starts afresh with the next step).
                step_losses.append(torch.stack(micro_metrics.pop("loss")).mean())
                state.step += 1
                state.images_seen += eff_batch
                window["images"] += eff_batch
                if state.step == timing_from:
                    totals["t_start"] = time.perf_counter()
                if rank_log is not None:
                    rank_log.write({"step": state.step, "digest": _param_digest(net)})
                if progress is not None:
                    progress.update(1)

                at_end = state.step >= stop_step
                if at_end:
                    totals["t_end"] = time.perf_counter()
                if state.step % cfg.log_every == 0 or at_end:
                    log_window()
                if knn_on and ((knn_every and state.step % knn_every == 0) or at_end):
                    # Before any checkpoint of this step, so a resumed run's RNG matches an uninterrupted one.
                    res = knn_evaluate(cfg, accelerator, net.encoder)
                    state.history["knn_top1"] = res["knn_top1"]
                    accelerator.log({"eval/knn_top1": res["knn_top1"]}, step=state.step)
                    metrics_log.write({"step": state.step, **res})
                    accelerator.print(f"step {state.step}: k-NN top-1 {res['knn_top1']:.2f}%")
                every = cfg.checkpoint.every_steps
                if (every and state.step % every == 0) or at_end:
                    log_window()  # never checkpoint weights that came from a non-finite loss
                    last_ckpt = save_checkpoint(accelerator, run_dir, state.step, config_yaml, cfg.checkpoint.keep,
                                                states=saved_states)
                if at_end:
                    done = True
                    break
    except BaseException as err:
        # Whatever stopped the run, status.json must say it did not complete, and why.
        failure = classify(err)
        status = failure.status
        raise
    finally:
        if progress is not None:
            progress.close()
        metrics_log.close()
        if rank_log is not None:
            rank_log.close()
        loader.close()
        accelerator.end_training()
        if is_main and cfg.plots:
            records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
            plot_curves(records, run_dir / "plots" / "curves.png")
            if sample_batch is not None:
                plot_masks(*sample_batch, cfg.model.grid_size, cfg.data.mean, cfg.data.std, run_dir / "plots" / "masks.png")
        if is_main:
            _write_status(run_dir, status, state.step, failure, latest_checkpoint(run_dir))

    return {
        "run_dir": str(run_dir),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "step": state.step,
        "steps_per_epoch": steps_per_epoch,
        "effective_batch": eff_batch,
        "peak_lr": sched.peak_lr,
        "precision": precision.precision,
        "threads": {"torch": threads.torch_threads, "loader": threads.loader_threads, "cores": threads.cores},
        "last": last_logged,
        "knn_top1": state.history.get("knn_top1"),
        "timing": _timing_summary(totals, state.step - timing_from, eff_batch),
    }


def _timing_summary(totals: dict, steps: int, eff_batch: int) -> dict[str, float] | None:
    """Steady-state figures of this invocation: steps/s, images/s and the share of wall time the
    loop spent blocked waiting for the next batch."""
    if totals["t_start"] is None or totals["t_end"] is None or steps <= 0:
        return None
    wall = max(totals["t_end"] - totals["t_start"], 1e-9)
    return {
        "steps": steps,
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "images_per_s": steps * eff_batch / wall,
        "data_wait_share": totals["wait"] / wall,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    cfg = None
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        summary = run(cfg)
    except (Exception, KeyboardInterrupt) as err:
        failure = classify(err)
        log_file = _log_traceback(cfg, err)
        _record_failed_start(cfg, failure)
        if args.debug or os.environ.get("LMIM_DEBUG") or not failure.expected:
            traceback.print_exception(err, file=sys.stderr)
        where = f" (traceback: {log_file})" if log_file and failure.expected else ""
        print(f"lmim pretrain: {failure.sentence}{where}", file=sys.stderr)
        return failure.code
    print(f"done: step {summary['step']}, checkpoint {summary['checkpoint']}, run folder {summary['run_dir']}")
    return 0


def _record_failed_start(cfg: DictConfig | None, failure: Failure) -> None:
    """A run folder that already has a status.json (a resumed run that failed before its loop)
    must not keep saying `completed`: record the failure, keeping its step."""
    if cfg is None or not cfg.run_dir:
        return
    run_dir = Path(cfg.run_dir)
    try:
        old = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return  # no status yet: a failed start leaves nothing behind
    if old.get("status") in ("failed", "interrupted") and old.get("kind") == failure.kind:
        return  # run() already recorded this failure
    _write_status(run_dir, failure.status, int(old.get("step", 0)), failure, latest_checkpoint(run_dir))


def _log_traceback(cfg: DictConfig | None, err: BaseException) -> Path | None:
    """Append the traceback to run_dir/logs/error.log when the run folder exists (never create it)."""
    if cfg is None or not cfg.run_dir or not Path(cfg.run_dir).is_dir():
        return None
    path = Path(cfg.run_dir) / "logs" / "error.log"
    try:
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {type(err).__name__}\n")
            traceback.print_exception(err, file=f)
        return path
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
