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

Each step ends in that order: log, checkpoint, evaluate (so an evaluation that fails loses no training).

`run` reads top to bottom; its pieces: `train_step` (train/step.py: forward, backward, clip,
AdamW, EMA; the benchmarks step through it too), `Cadence` (train/cadence.py: when to log,
evaluate, checkpoint, stop), `Meter` (train/meter.py: data wait, images/s and metric averages per
logging window) and `Reporter` (train/report.py: trackers, metrics.jsonl, progress bar, the
non-finite-loss and collapse checks, plots).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from lmim.pipeline.errors import DataError, StoreUnreachable
from lmim.pipeline.mix import describe_mixture
from lmim.train.allocator import keep_freed_memory
from lmim.train.cadence import Cadence
from lmim.train.checkpoint import (
    COMPLETE_MARKER,
    CheckpointDamaged,
    CheckpointError,
    RankedState,
    TrainState,
    folder_bytes,
    install_unwrapped_model_hooks,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_incomplete,
    rng_untouched,
    save_checkpoint,
    set_aside_damaged,
    unfinished_checkpoints,
    verify_checkpoint,
)
from lmim.train.config import ConfigError, effective_batch_size, load_config, preset_names, save_config, to_yaml
from lmim.train.failures import (
    EXIT_CLOSED_PIPE,
    TRAINING_RUN,
    Failure,
    Rerun,
    TrainingError,
    classify,
    sigterm_interrupts,
    silence_stdout,
)
from lmim.train.hardware import ThreadBudget, core_share, describe_machine, plan_threads, resolve_precision
from lmim.train.meter import Meter
from lmim.train.observe import read_metrics
from lmim.train.report import Reporter
from lmim.train.run_lock import RunFolderBusy, RunFolderLock
from lmim.train.schedules import Schedules
from lmim.train.signals import hold_interruptions, pending_interruption, raise_pending
from lmim.train.step import Stepper, make_optimizer, train_step

if TYPE_CHECKING:  # the model (timm) loads when a run builds one, not when the CLI starts
    from lmim.model import LatentMIM
    from lmim.pipeline.batch import Batch

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
                   help="also print the traceback of a failure (LMIM_DEBUG=1 does the same; it is always in "
                        "run_dir/logs/error.log, except for a bad setting)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.base_lr=3e-4 data.url=s3://b/p")
    return p.parse_intermixed_args(argv)  # options and key=value overrides in any order


class RunFolderInUse(ConfigError):
    """A fresh run was pointed at another run's folder. The refusal must leave that folder as it
    was: its status.json and logs belong to the other run."""


# model.* settings that decide the shapes of the weights: a checkpoint loads only with its own values.
_SHAPE_KEYS = ("arch", "embed_dim", "depth", "num_heads", "patch_size", "grid_size", "in_chans",
               "projector_hidden_dim", "projector_layers", "decoder_dim", "decoder_depth", "decoder_num_heads",
               "decoder_mlp_ratio", "visual_cues", "query_self_attn", "objective")


def _check_same_model(cfg: DictConfig, checkpoint: Path) -> None:
    """Refuse, before anything is written, to resume a checkpoint with another model shape: its
    weights would not load, and the failure would read as a damaged checkpoint."""
    try:
        saved_cfg = OmegaConf.load(checkpoint / "config.yaml")
        saved = saved_cfg.get("model") or {}
        saved_loader = OmegaConf.select(saved_cfg, "data.loader")
    except Exception:  # unreadable: the checkpoint's own verification will say so, with its fallback
        return
    changed = [f"model.{k} is {OmegaConf.select(cfg.model, k)!r} but {checkpoint.name} was trained with {saved[k]!r}"
               for k in _SHAPE_KEYS if k in saved and saved[k] != OmegaConf.select(cfg.model, k)]
    if saved_loader is not None and (saved_loader == "synthetic") != (cfg.data.loader == "synthetic"):
        # the synthetic loader's position is not a data position: neither can continue from the other's
        changed.append(f"data.loader is {cfg.data.loader!r} but {checkpoint.name} was trained with {saved_loader!r}")
    if changed:
        raise ConfigError(f"cannot resume from {checkpoint}: {'; '.join(changed[:3])}. Resume with the settings "
                          "the run was started with (its checkpoints' config.yaml), or start a new run_dir.")


def _resolve_resume(cfg: DictConfig) -> Path | None:
    """Which checkpoint to start from. A fresh run into a folder that already holds checkpoints is
    refused, rather than silently mixing two runs' checkpoints and logs."""
    run_dir = Path(cfg.run_dir)
    if cfg.resume in (None, "", "none", "never"):
        found = list_checkpoints(run_dir)
        if found:
            raise RunFolderInUse(
                f"run_dir {str(run_dir)!r} already holds checkpoints (newest: {found[-1][1].name}); "
                "add resume=auto to continue that run, or choose another run_dir."
            )
        return None
    if cfg.resume == "auto":
        path = latest_checkpoint(run_dir)
        if path is not None:
            _check_same_model(cfg, path)
        return path
    path = Path(cfg.resume)
    from lmim.train.checkpoint import is_complete

    if not is_complete(path):
        raise ConfigError(f"resume={cfg.resume!r} is not a complete checkpoint folder (step_* with complete.json).")
    _check_same_model(cfg, path)
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
            channels=m.in_chans,
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
    cores, why = core_share()
    plan = plan_threads(cores, int(cfg.data.num_threads), model_on_cpu=accelerator.device.type == "cpu")
    if cfg.threads is not None:  # the user's torch thread count wins; the loader keeps its share
        if int(cfg.threads) > cores:
            _warn(accelerator, f"threads={cfg.threads} is more than the {cores} core(s) of this process's share: "
                               "the model's threads will wait on each other (two busy pools on the same cores made a "
                               "0.34 s step take 6-9 s); leave threads unset for the budget.")
        plan = dataclasses.replace(plan, torch_threads=int(cfg.threads),
                                   reason=plan.reason.split(":")[0] + f": threads={cfg.threads} for the model as configured, "
                                   f"{plan.loader_threads} for the loader")
    cores_said, split = plan.reason.split(":", 1)
    return dataclasses.replace(plan, reason=f"{cores_said} ({why}):{split}")


def _prepare_run_dir(cfg: DictConfig, run_dir: Path, lock: RunFolderLock | None = None) -> None:
    """Create or reuse run_dir (process 0): lock it (a new folder: right after creating it, before
    anything is cleaned or written), clear interrupted writes, write config.yaml."""
    created = not run_dir.exists()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {str(run_dir)!r} is a file, not a folder: choose another run_dir (or move the "
                          "file away).")
    for folder in ("checkpoints", "logs"):   # found at the first checkpoint, after hours, otherwise
        if (run_dir / folder).exists() and not (run_dir / folder).is_dir():
            raise ConfigError(f"run_dir {str(run_dir)!r} holds a file named {folder!r} where its {folder} folder goes: "
                              "move the file away or choose another run_dir.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if lock is not None:   # two starts that both found no folder: one gets it, the other touches nothing
            _lock_run_folder(lock, run_dir)
        remove_incomplete(run_dir)  # leftovers of a write that was interrupted; never resumed from
        save_config(cfg, run_dir / "config.yaml")
    except OSError as err:
        if created and (lock is None or lock.held):  # a new folder of ours that could not be written: no husk
            shutil.rmtree(run_dir, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk or quota, not a bad setting: exit 6, free space
            raise
        raise ConfigError(f"run_dir {str(run_dir)!r} cannot be written ({err.strerror or err}): "
                          "choose a writable folder with run_dir=PATH.") from None


def _write_status(run_dir: Path, status: str, step: int, failure: Failure | None, checkpoint: Path | None,
                  setup: dict[str, Any] | None = None) -> None:
    """status.json, replaced atomically: a reader sees the old status or the new one, never a torn file.

    {"status": running|completed|failed|interrupted, "step", "last_checkpoint", "setup" (what this
    start chose for the machine: precision and why, threads, the machine's line), and on failure
    "kind" (config|data|storage|disk|checkpoint|diverged|peer|interrupted|bug), "message", "exit_code"}.
    """
    # absolute: a scheduler or a script reading status.json from another folder must find the checkpoint
    record: dict[str, Any] = {"status": status, "step": step,
                              "last_checkpoint": os.path.abspath(checkpoint) if checkpoint else None}
    if status == "running":   # a "running" left by a kill -9: the reader can check this process is gone
        record.update(host=socket.gethostname(), pid=os.getpid())
    if setup is not None:
        record["setup"] = setup
    if failure is not None:
        record.update(kind=failure.kind, message=failure.sentence, exit_code=failure.code)
    tmp = run_dir / f".status.json.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, run_dir / "status.json")
    except OSError:  # e.g. the disk is full: keep the previous status rather than a truncated one
        tmp.unlink(missing_ok=True)


def _say(line: str) -> None:
    """One line on stderr in one write. With PYTHONUNBUFFERED=1 (common in containers and batch
    jobs) print() writes the text and its newline separately, and another process of the launch
    could put its own line between the two."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def _warn(accelerator, message: str) -> None:
    """A warning, once (process 0), on stderr beside the failures, not in the stdout log of progress."""
    if accelerator.is_main_process:
        _say(f"warning: {message}")


def _load_resume(cfg: DictConfig, accelerator, first: Path, states: dict[str, Any]) -> tuple[Path, list[Path]]:
    """Load `first`; with resume=auto, fall back to older complete checkpoints when it is damaged.
    Returns the checkpoint loaded and the damaged ones passed over, as process 0 found them (newest
    first; not those that failed for another reason, such as a read error or a state that does not
    fit this run).

    Every process loads the same checkpoint: process 0's list of candidates is everyone's, each one
    is verified on every process before any loads it, and one that any process cannot verify or
    load (a read error on its node, say) is passed over by all. Chosen each on its own, the ranks
    could resume at different steps with different weights.

    Raises:
        CheckpointError: no candidate could be loaded (one sentence naming the newest's problem).
    """
    candidates = [first]
    if cfg.resume == "auto":
        candidates += [p for _, p in reversed(list_checkpoints(cfg.run_dir)) if p != first]
    candidates = _as_on_process_0(accelerator, candidates)
    errors: list[CheckpointError] = []
    damaged: list[Path] = []
    for path in candidates:
        agreed, damaged_on_0 = _agreed_outcome(accelerator, _raised_by(verify_checkpoint, path))
        if agreed is None:
            loaded = _raised_by(load_checkpoint, accelerator, path, states, verify=False)
            agreed, _ = _agreed_outcome(accelerator, loaded)
        if agreed is None:
            return path, damaged
        errors.append(agreed)
        if damaged_on_0:   # process 0 does the renaming: only damage it saw itself
            damaged.append(path)
        if len(candidates) > 1:  # every skipped checkpoint is named with its reason
            then = "Trying the previous checkpoint." if path is not candidates[-1] else "No older checkpoint is left."
            _warn(accelerator, f"skipping {path.name}: {agreed} {then}")
    if len(errors) == 1:
        raise errors[0]
    names = ", ".join(p.name for p in candidates)
    raise CheckpointError(f"none of the {len(errors)} checkpoints in {cfg.run_dir} can be loaded ({names}; each "
                          f"one's reason is printed above); the newest: {errors[0]}")


T = TypeVar("T")


def _as_on_process_0(accelerator, value: T) -> T:
    """Process 0's `value` (picklable), on every process (one process: as it is)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _raised_by(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Exception | None:
    """What fn(*args, **kwargs) raised, or None: every process must reach the next collective."""
    try:
        fn(*args, **kwargs)
    except Exception as err:   # noqa: BLE001  (sorted out by _agreed_outcome, on every process alike)
        return err
    return None


def _agreed_outcome(accelerator, mine: Exception | None) -> tuple[CheckpointError | None, bool]:
    """Every process's outcome of one step of loading a checkpoint, as one: (None, False) when all
    succeeded; else the lowest-ranked failing process's CheckpointError (named with its process when
    that is not process 0) and whether process 0 itself found the checkpoint damaged. Anything else
    raised (a bug) stops every process: the one that met it raises its own error, the others say so."""
    if accelerator.num_processes == 1:
        if mine is not None and not isinstance(mine, CheckpointError):
            raise mine
        return mine, isinstance(mine, CheckpointDamaged)
    from accelerate.utils import gather_object

    def kind(err: Exception) -> str:
        if isinstance(err, CheckpointError):
            return "damaged" if isinstance(err, CheckpointDamaged) else "error"
        return "bug"

    outcomes = gather_object([None if mine is None else (kind(mine), str(mine))])
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
    if not failed:
        return None, False
    if mine is not None and kind(mine) == "bug":
        raise mine
    bugs = [(rank, text) for rank, (k, text) in failed if k == "bug"]
    if bugs:
        raise RuntimeError(f"process {bugs[0][0]} failed while loading a checkpoint: {bugs[0][1]}")
    rank, (k, text) = failed[0]
    text = text if rank == 0 else f"process {rank}: {text}"
    agreed = CheckpointDamaged(text) if k == "damaged" else CheckpointError(text)
    if rank == accelerator.process_index:
        agreed.__cause__ = mine   # the original error's traceback, for logs/error.log and --debug
    return agreed, outcomes[0] is not None and outcomes[0][0] == "damaged"


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
    if precision.warning:
        _warn(accelerator, precision.warning)
    accelerator.print(precision.reason)
    return accelerator, precision


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so that another `run` in the same process (a
    benchmark's or a test's) starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _use_threads(cfg: DictConfig, accelerator) -> ThreadBudget:
    threads = thread_budget(cfg, accelerator)
    torch.set_num_threads(threads.torch_threads)
    accelerator.print(f"threads: {threads.reason}")
    return threads


def _seeded_model(cfg: DictConfig) -> LatentMIM:
    """The model, with the same initial weights on every process (DDP also broadcasts rank 0's);
    then each process is seeded apart for everything random during training (patch-gap jitter, ...)."""
    from accelerate.utils import set_seed

    from lmim.model import LatentMIM

    set_seed(cfg.seed)
    try:
        model = LatentMIM(OmegaConf.to_object(cfg.model))
    except (AssertionError, RuntimeError, TypeError, ValueError, KeyError) as err:
        # timm's own refusals (an unknown name, a width its heads do not divide, an argument its
        # family does not take) are settings to change, not bugs: say which, before anything is written.
        raise ConfigError(f"Cannot build the model from {_model_settings(cfg)}: {_first_line(err)}; change these "
                          "model.* settings (model.arch must be a timm ViT such as vit_base_patch16_224, and "
                          "model.embed_dim a multiple of model.num_heads).") from None
    set_seed(cfg.seed, device_specific=True)
    return model


def _model_settings(cfg: DictConfig) -> str:
    """The model.* keys that decide how timm builds the encoder, as `key=value` words."""
    keys = ("arch", "embed_dim", "depth", "num_heads", "patch_size", "in_chans")
    values = {k: OmegaConf.select(cfg.model, k) for k in keys}
    return ", ".join(f"model.{k}={'null' if v is None else v}" for k, v in values.items())


def _first_line(err: BaseException) -> str:
    """An exception's message as a clause: its first line, without a trailing full stop."""
    text = str(err).strip().strip("'\"")
    return (text.splitlines()[0].rstrip(".") if text else type(err).__name__) or type(err).__name__


def _check_eval_splits(cfg: DictConfig) -> None:
    """data.eval_url (and eval.knn_train_url) are read only at the first k-NN evaluation, possibly
    after hours of training: check now that each exists, has class labels and enough images."""
    from lmim.pipeline.storage import RetryPolicy
    from lmim.train.evaluate.splits import SplitError, check_same_classes, knn_split_classes

    if cfg.eval.knn_train_url and not cfg.data.eval_url:
        raise ConfigError("eval.knn_train_url is set but data.eval_url is not: k-NN scores data.eval_url against "
                          "it, so set data.eval_url too (or eval.knn_train_url=null).")
    retry = RetryPolicy(budget_s=float(cfg.data.retry_budget_s))
    options = OmegaConf.to_container(cfg.data.storage_options, resolve=True) or {}
    classes: dict[str, list[str]] = {}
    for key, url, least in (("data.eval_url", cfg.data.eval_url, 2), ("eval.knn_train_url", cfg.eval.knn_train_url, 1)):
        if not url:
            continue
        try:
            classes[key] = knn_split_classes(str(url), f"{key} {str(url)!r}", storage_options=options, retry=retry,
                                             least=least)
        except StoreUnreachable:
            raise
        except DataError as err:  # the sentence says which of the run's data sets it is
            raise DataError(f"{key}: {err}") from None
        except SplitError as err:
            raise ConfigError(f"{err}; or set {key}=null.") from None
    if len(classes) == 2:
        try:
            check_same_classes("eval.knn_train_url", classes["eval.knn_train_url"], "data.eval_url",
                               classes["data.eval_url"])
        except SplitError as err:
            raise ConfigError(f"{err}.") from None


def _open_loader(cfg: DictConfig, accelerator) -> tuple[Any, int]:
    """This process's training loader and the optimizer steps in one of its epochs."""
    if cfg.data.loader != "synthetic":
        _check_eval_splits(cfg)
    loader = make_loader(cfg, accelerator, train=True)
    if getattr(loader, "shard_mode", None) == "shared shards":
        accelerator.print(f"data: {len(loader.counts)} shard(s) for {accelerator.num_processes} processes: the "
                          "processes share shards, each taking its own samples (docs/TRAINING.md, shards and ranks)")
    if getattr(loader, "mix", None) is not None:
        accelerator.print(describe_mixture(loader.sources, loader.mix, accelerator.num_processes))
    micro_per_epoch = len(loader)
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"The dataset gives {micro_per_epoch} batches per process per epoch, fewer than grad_accum={cfg.grad_accum}; "
            "lower data.batch_size or grad_accum."
        )
    return loader, steps_per_epoch


def _say_what_will_not_happen(cfg: DictConfig, accelerator, steps_per_epoch: int, total_steps: int) -> None:
    """Settings that are valid but do less than they say: one line each, so the run holds no surprise."""
    if cfg.max_steps is not None and cfg.max_steps > total_steps:
        accelerator.print(f"max_steps={cfg.max_steps} is beyond the schedule's {total_steps} steps (epochs={cfg.epochs} x "
                          f"{steps_per_epoch} steps per epoch): the run stops at step {total_steps}; raise epochs to "
                          "train longer (the lr and EMA schedules span the epochs)")
    if cfg.eval.knn_every_epochs > 0 and cfg.data.loader == "synthetic":
        accelerator.print(f"no k-NN evaluation: eval.knn_every_epochs={cfg.eval.knn_every_epochs} but data.loader="
                          "synthetic has no labelled split; use data.loader=dali or torch with data.eval_url to "
                          "monitor k-NN top-1")
    elif cfg.eval.knn_every_epochs > 0 and not cfg.data.eval_url:
        accelerator.print(f"no k-NN evaluation: eval.knn_every_epochs={cfg.eval.knn_every_epochs} but data.eval_url is "
                          "not set; set data.eval_url to a labelled split (as the vit_*_in1k presets' example commands "
                          "do) to monitor k-NN top-1")


def _make_stepper(cfg: DictConfig, accelerator, model: LatentMIM, sched: Schedules) -> Stepper:
    """AdamW for `model`, then torch.compile (compile=true) and Accelerate's wrapping (DDP, autocast)."""
    optimizer = make_optimizer(model, cfg.optim, sched.lr(0))
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)  # LatentMIM itself: update_target, .encoder for k-NN
    model.train()
    return Stepper(model, net, optimizer, sched, clip_grad=cfg.optim.clip_grad, accelerator=accelerator)


def _set_aside(damaged: list[Path], accelerator) -> None:
    """Rename the damaged checkpoints resume=auto passed over (process 0, every process done loading):
    out of the listing, or rotation (checkpoint.keep, by write order) would delete the good checkpoint
    just loaded before a damaged newer one; kept under another name for a person to inspect."""
    for path in damaged:
        try:
            size = folder_bytes(path) / 2**20
            moved = (f"moved aside to {set_aside_damaged(path).name} ({size:.0f} MiB; never resumed from or rotated "
                     "out: delete it when you no longer need it)")
        except OSError as err:   # the run goes on; rotation may then count it (as before)
            moved = f"it could not be moved aside ({err.strerror or err}); move or delete it by hand"
        _warn(accelerator, f"{path.name} is damaged; {moved}.")


def _restore(cfg: DictConfig, accelerator, loader, resume_from: Path | None
             ) -> tuple[TrainState, dict[str, Any], Path | None, list[Path]]:
    """The loop's checkpointed state: (TrainState, the states saved with every checkpoint, the
    checkpoint loaded or None, the damaged checkpoints resume=auto passed over); resuming also loads
    the model, optimizer and RNG states."""
    state = TrainState(world_size=accelerator.num_processes)
    install_unwrapped_model_hooks(accelerator)
    # Saved as JSON next to the weights (never pickled), in this order (see lmim.train.checkpoint).
    saved_states = {"trainer_state": state,
                    "loader_state": RankedState(loader, accelerator.process_index, accelerator.num_processes)}
    resumed, damaged = None, []
    resume_from = _as_on_process_0(accelerator, resume_from)   # None too: every process resumes, or none
    if resume_from is not None:
        resumed, damaged = _load_resume(cfg, accelerator, resume_from, saved_states)
        accelerator.print(f"resumed from {resumed} at step {state.step}")
    return state, saved_states, resumed, damaged


def _rebase_steps(state: TrainState, loader, steps_per_epoch: int, eff_batch: int, cfg: DictConfig, accelerator,
                  sched: Schedules) -> None:
    """A run resumed with another number of steps per epoch (another number of processes, batch size
    or grad_accum) would otherwise count its steps against the old epochs: end early or late, with
    the lr and EMA schedules jumped. Move the step counter to where this run's schedules expect the
    loader's position (the rest of the interrupted epoch, or the next epoch when the data could not
    resume mid-epoch), so lr, EMA momentum and the cadence go on from the same point of training. The
    same when only the data moved to the next epoch (another seed, data set or mixture): the steps of
    the rest of the old epoch are skipped with it, or the run would train past `epochs`. The peak lr
    follows the new effective batch (the linear scaling rule). Nothing to do when nothing changed (a
    checkpoint of an older lmim records no steps per epoch: only its process count is compared)."""
    old_step = state.step
    changed = []
    if state.world_size != accelerator.num_processes:
        changed.append(f"{state.world_size} -> {accelerator.num_processes} processes")
    if state.steps_per_epoch and state.steps_per_epoch != steps_per_epoch:
        changed.append(f"{state.steps_per_epoch} -> {steps_per_epoch} steps per epoch")
    jumped = bool(getattr(loader, "resumed_at_next_epoch", False))  # another seed, data or mixture
    if jumped and not changed:
        changed.append("the data going on from the next epoch")
    if not changed:
        return
    state.step = max(0, (loader.epoch + 1) * steps_per_epoch - loader.batches_left() // cfg.grad_accum)
    lr_note = ""
    if state.effective_batch and state.effective_batch != eff_batch:
        lr_note = (f"; peak lr {sched.peak_lr:.3g} for the effective batch {eff_batch} (was {state.effective_batch}; "
                   "set grad_accum or data.batch_size to keep it)")
    where = f"the start of epoch {loader.epoch}" if jumped else f"the same point of epoch {loader.epoch}"
    accelerator.print(f"resumed with {', '.join(changed)}: step {old_step} becomes {state.step} of "
                      f"{sched.total_steps}, {where}{lr_note}")


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
def run(cfg: DictConfig, rerun: Rerun = TRAINING_RUN, lock: RunFolderLock | None = None) -> dict[str, Any]:
    """Train per `cfg` (a resolved TrainConfig); returns a summary (paths, last metrics, timings).
    `rerun` is how status.json tells the user to go on after a stop that loses nothing; `lock` is the
    run folder's lock when the caller took it already (`main`, which keeps it to record a failure).

    Raises:
        ConfigError: a bad setting found at start-up (one sentence); RunFolderInUse when another
            run is using run_dir now.
        TrainingError: non-finite loss, or collapse with collapse_guard.action=stop.
    """
    if lock is not None:
        return _run(cfg, rerun, lock)
    with RunFolderLock() as own:   # process 0 holds it from its first look at run_dir to the end
        return _run(cfg, rerun, own)


def _lock_run_folder(lock: RunFolderLock, run_dir: Path) -> None:
    try:
        lock.acquire(run_dir)
    except RunFolderBusy:
        raise RunFolderInUse(f"run_dir {str(run_dir)!r} is in use by another lmim pretrain running now; wait for it "
                             "to end (or stop it), then start this one again (with resume=auto to continue it)."
                             ) from None


def _run(cfg: DictConfig, rerun: Rerun, lock: RunFolderLock) -> dict[str, Any]:
    accelerator, precision = _make_accelerator(cfg)
    threads = _use_threads(cfg, accelerator)
    if accelerator.device.type == "cpu":  # a CPU step reuses its activations' memory (train/allocator.py)
        accelerator.print(keep_freed_memory())
    run_dir = Path(cfg.run_dir)
    if accelerator.is_main_process and run_dir.is_dir():   # before reading its checkpoints
        _lock_run_folder(lock, run_dir)
    resume_from = _resolve_resume(cfg)
    if cfg.resume == "auto":   # every checkpoint resume=auto passes over is named, these too
        for path in unfinished_checkpoints(run_dir):
            _warn(accelerator, f"skipping {path.name}: it has no {COMPLETE_MARKER} or no model.safetensors (a copy "
                               "cut short, or a write that never finished), so it is never resumed from.")
    model = _seeded_model(cfg)
    loader, steps_per_epoch = _open_loader(cfg, accelerator)
    eff_batch = effective_batch_size(cfg, accelerator.num_processes)
    sched = Schedules.from_config(cfg, steps_per_epoch, eff_batch)
    cadence = Cadence.from_config(cfg, steps_per_epoch, sched.total_steps)
    _say_what_will_not_happen(cfg, accelerator, steps_per_epoch, sched.total_steps)
    stepper = _make_stepper(cfg, accelerator, model, sched)
    state, saved_states, resumed, damaged = _restore(cfg, accelerator, loader, resume_from)
    # Only now, with the data readable and the checkpoint loaded, does the run folder get written: a
    # start that fails on its data, config or checkpoints leaves nothing behind (no config.yaml that
    # looks like a run, nor one that no longer matches the run's checkpoints).
    if accelerator.is_main_process:
        _prepare_run_dir(cfg, run_dir, lock)
    accelerator.wait_for_everyone()   # every process has loaded its checkpoint: none reads the damaged ones now
    if accelerator.is_main_process:
        _set_aside(damaged, accelerator)
    accelerator.wait_for_everyone()
    if resumed is not None:
        saved_step = state.step
        _rebase_steps(state, loader, steps_per_epoch, eff_batch, cfg, accelerator, sched)
        # the evaluation due at the checkpoint's own step; none when the resume moved the step counter
        owed = state.step == saved_step and _evaluation_owed(cadence, state, run_dir, accelerator)
    state.world_size, state.steps_per_epoch, state.effective_batch = accelerator.num_processes, steps_per_epoch, eff_batch
    if resumed is not None and cadence.done(state.step):
        accelerator.print(f"nothing left to train: the checkpoint is at step {state.step} and this run stops at step "
                          f"{cadence.stop_step}; raise epochs (or max_steps) to train longer")
    reporter = Reporter(cfg, accelerator, schedules=sched, steps_per_epoch=steps_per_epoch, loader=loader,
                        start_step=state.step, stop_step=cadence.stop_step)
    meter = Meter(eff_batch, start_step=state.step, stop_step=cadence.stop_step)
    last_ckpt = resumed   # the checkpoint the model now holds (resume=PATH may name another run's)

    status, failure = "completed", None
    # config.yaml keeps what was asked (precision: auto, threads: null); this is what the machine got
    setup = {"precision": precision.precision, "precision_reason": precision.reason,
             "threads": {"torch": threads.torch_threads, "loader": threads.loader_threads, "cores": threads.cores,
                         "reason": threads.reason},
             "machine": describe_machine(accelerator.device.type)}
    if accelerator.is_main_process:
        _write_status(run_dir, "running", state.step, None, resumed, setup)
    try:
        if resumed is not None and owed:
            # the run stopped between this checkpoint and its evaluation (the checkpoint comes first):
            # do it now, or the run would end "completed" without its k-NN figure, or skip one for good
            accelerator.print(f"step {state.step}: the k-NN evaluation of this checkpoint did not finish; running it")
            with rng_untouched():
                result = knn_evaluate(cfg, accelerator, stepper.net.encoder)
            state.history["knn_top1"] = result["knn_top1"]
            reporter.evaluation(state, result)
        batches = reporter.watch(_epochs(loader, meter), state)
        while not cadence.done(state.step):
            raise_pending()   # a SIGTERM/SIGHUP whose exception a library's finalizer swallowed stops here
            recorded = cadence.records(state.step + 1)   # this step closes a metrics window (diagnostics too)
            outs = train_step(stepper, batches, state.step, metrics=recorded)
            state.step += 1
            state.updates += 1
            state.micro_step += len(outs)
            state.images_seen += eff_batch
            meter.add_step(outs, state.step)
            reporter.step_done(state.step, stepper.net)
            if recorded:   # before an evaluation or a checkpoint too (Cadence.records)
                reporter.window(meter, state, last_ckpt)
            # The checkpoint comes before the evaluation: an evaluation that stops the run (its split
            # unreadable, the store down) loses no training. The evaluation leaves the RNGs as it found
            # them, so a run resumed from this checkpoint goes on as an uninterrupted one.
            if cadence.checkpoints(state.step):
                last_ckpt = save_checkpoint(accelerator, run_dir, state.step, to_yaml(cfg), cfg.checkpoint.keep,
                                            states=saved_states)
                if accelerator.is_main_process:  # a scheduler or a person watching sees the run's progress
                    _write_status(run_dir, "running", state.step, None, last_ckpt, setup)
            if cadence.evaluates(state.step):
                with rng_untouched():
                    result = knn_evaluate(cfg, accelerator, stepper.net.encoder)
                state.history["knn_top1"] = result["knn_top1"]
                reporter.evaluation(state, result)
    except BaseException as err:
        hold_interruptions()   # a SIGTERM now (a launcher stopping the others) must not cut the clean-up short
        # Whatever stopped the run, status.json must say it did not complete, and why.
        failure = classify(err, rerun, launched=accelerator.num_processes > 1)
        status = failure.status
        raise
    finally:
        reporter.close()
        loader.close()
        accelerator.end_training()
        if cfg.plots:
            reporter.plot()
        if accelerator.is_main_process:
            # what it loaded when it saved nothing (resume=PATH may name another run's); else the newest
            # on disk (a save can fail after its rename, while rotating out an old one)
            shown = last_ckpt if resumed is not None and last_ckpt is resumed else latest_checkpoint(run_dir)
            _write_status(run_dir, status, state.step, failure, shown, setup)
    return {
        "run_dir": str(run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None, "step": state.step,
        "steps_per_epoch": steps_per_epoch, "effective_batch": eff_batch, "peak_lr": sched.peak_lr,
        "precision": precision.precision,
        "threads": {"torch": threads.torch_threads, "loader": threads.loader_threads, "cores": threads.cores},
        "last": reporter.last, "knn_top1": state.history.get("knn_top1"), "timing": meter.summary(state.step),
    }


def _evaluation_owed(cadence: Cadence, state: TrainState, run_dir: Path, accelerator) -> bool:
    """Whether the checkpoint resumed from sits at an evaluation step whose k-NN result never reached
    metrics.jsonl (the run was stopped during that evaluation). Process 0 reads the file and every
    process takes its answer (the evaluation is collective: all must decide alike)."""
    if state.updates == 0 or not cadence.evaluates(state.step):
        return False
    owed = accelerator.is_main_process and not any(
        rec.get("update") == state.updates and "knn_top1" in rec for rec in read_metrics(run_dir / "metrics.jsonl"))
    return bool(_as_on_process_0(accelerator, owed))


def _epochs(loader, meter: Meter) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch (each pass gives the rest of the loader's current
    epoch, then moves it to the next), their data wait measured. A step's micro-batches span two
    epochs when grad_accum does not divide one.

    One empty pass is normal: a run resumed from a checkpoint written after an epoch's last batch
    starts with that epoch's (empty) rest. Two in a row mean a whole epoch gave nothing."""
    empty_passes = 0
    while True:
        empty = True
        for batch in meter.timed(loader):
            empty = False
            yield batch
        empty_passes = empty_passes + 1 if empty else 0
        if empty_passes == 2:  # another pass would give nothing too: stop instead of spinning forever
            raise DataError("the data loader gave no batch for a whole epoch (every sample or shard skipped?); "
                            "find the broken shards with `lmim verify DST` and rebuild them with `lmim shard SRC DST --recheck`.")


def main(argv: list[str] | None = None) -> int:
    with sigterm_interrupts(), RunFolderLock() as lock:   # the lock outlives run(): a failure is recorded under it
        return _main(argv, lock)


def _main(argv: list[str] | None, lock: RunFolderLock) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    cfg = None
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            sys.stdout.flush()  # a reader that went away (`| head`) shows here, where it is classified
            return 0
        if _launcher_rank()[0] == 0 and Path(cfg.run_dir).is_dir():   # first thing, before torch's slow start
            _lock_run_folder(lock, Path(cfg.run_dir))
        summary = run(cfg, lock=lock)
    except (Exception, KeyboardInterrupt) as err:
        hold_interruptions()   # nor the report of the failure (its log, status and sentence)
        rank, world = _launcher_rank()
        failure = classify(err, launched=world > 1)
        log_file = None
        # A refused setting is the command's mistake, not an event of the run in run_dir (which may be a
        # finished run resumed by mistake), and a folder in use is another run's: write nothing into either.
        # Only the process that holds the folder's lock writes there (process 0 of this run; never the
        # other processes of a launch that was refused the folder, nor a start refused before its lock).
        if not isinstance(err, RunFolderInUse) and failure.kind != "config" and lock.claimed:
            log_file = _log_traceback(cfg, err)
            _record_failed_start(cfg, failure)
        if args.debug or os.environ.get("LMIM_DEBUG") or not failure.expected:
            traceback.print_exception(err, file=sys.stderr)
        where = f" (traceback: {log_file})" if log_file and failure.expected else ""
        if failure.code == EXIT_CLOSED_PIPE:  # nothing more can reach stdout
            silence_stdout()
        # Every process of a launch reads the same config, agrees on the checkpoint it resumes from
        # (`_load_resume`), gets a SIGTERM alike (a scheduler's stop, or torchrun stopping the others
        # once one has failed), and sees its collectives break alike when one process has gone (the
        # gone one says its own reason): process 0 says those for all of them. Any other failure may
        # be one process's own (its shards, its device), so each says which process it is.
        who = f"lmim pretrain (process {rank} of {world})" if world > 1 else "lmim pretrain"
        if world == 1 or rank == 0 or failure.kind not in ("config", "checkpoint", "interrupted", "peer"):
            _say(f"{who}: {failure.sentence}{where}")
        elif failure.kind in ("config", "checkpoint") and not _launcher_stopped_us(grace_s=10.0):
            # no launcher stopped this process: process 0 did not meet this error (a setting only this
            # node refuses, such as its cache_dir), or there is no launcher, only a RANK variable
            _say(f"{who}: {failure.sentence}{where}")
        if world > 1:
            if failure.kind == "peer":
                # the process that failed first should also be the first to exit, so that the launcher's
                # summary (torchrun's "root cause", srun's first failed task) names it, not this one
                _launcher_stopped_us(grace_s=3.0)
            _leave_now(failure.code)
        return failure.code
    if _launcher_rank()[0] == 0:   # once per run, not once per process
        try:
            print(f"done: step {summary['step']}, checkpoint {summary['checkpoint']}, run folder {summary['run_dir']}",
                  flush=True)
        except BrokenPipeError:  # the run is complete; only its last line had no reader
            silence_stdout()
    return 0


def _leave_now(code: int) -> NoReturn:
    """Exit a process of a multi-process launch that failed, without unwinding further. Freeing the
    error's frames frees DDP's reducer and with it the gloo process group, whose destructor joins its
    worker thread while holding the GIL; a worker still releasing a work item's tensors needs the GIL:
    the process hung there for good, the failing one as well as one whose peer had gone, and a peer
    waiting for it in a collective with it (torch 2.x, seen in the tests one run in a few). Its
    sentence, status.json and error log are written by now; the OS releases the run folder's lock."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a reader that went away (`| tee` stopped), a closed stream
            pass
    os._exit(code)


def _launcher_stopped_us(grace_s: float) -> bool:
    """Hold this process's exit back for up to `grace_s`, until the launcher stops it. torchrun stops
    every process as soon as one exits: a silent process that exited first could have process 0
    killed before it said the sentence for all (seen on a busy machine: the launch failed without a
    word), and one whose collective broke would be named as the launch's first failure instead of
    the process that did fail. True when the launcher's SIGTERM (sent once another process has
    exited) or Ctrl-C ended the wait; False when `grace_s` ran out (for a silent process: process 0
    evidently did not stop on this error)."""
    deadline = time.monotonic() + grace_s
    try:
        while time.monotonic() < deadline:
            if pending_interruption() is not None:   # the SIGTERM came (held, not raised: see signals.hold_interruptions)
                return True
            time.sleep(0.05)
    except KeyboardInterrupt:   # Ctrl-C still raises
        return True
    return False


def _launcher_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun / accelerate launch set them; (0, 1) for a lone process."""
    try:
        return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 0, 1


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
    _write_status(run_dir, failure.status, int(old.get("step", 0)), failure, latest_checkpoint(run_dir),
                  old.get("setup"))


def _log_traceback(cfg: DictConfig | None, err: BaseException) -> Path | None:
    """Append the traceback to run_dir/logs/error.log when the run folder exists (never create it)."""
    if cfg is None or not cfg.run_dir or not Path(cfg.run_dir).is_dir():
        return None
    path = Path(cfg.run_dir) / "logs" / "error.log"
    new_dir, new_file = not path.parent.exists(), not path.exists()
    try:
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {type(err).__name__}\n")
            traceback.print_exception(err, file=f)
        return path
    except OSError:  # e.g. the disk is full: no empty error.log (or logs/) that suggests a traceback is there
        if new_file:
            path.unlink(missing_ok=True)
        if new_dir:
            shutil.rmtree(path.parent, ignore_errors=True)
        return None


if __name__ == "__main__":
    sys.exit(main())
