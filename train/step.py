"""One optimizer step of Latent MIM: forward, backward, clip, AdamW, EMA target update.

The trainer (`lmim.train.pretrain`) and the benchmarks (`lmim bench model`, `lmim bench train`,
`lmim bench quality`) all step through `train_step`, so what they time is what trains, and the
learning rate, s* and EMA momentum of step `s` come from the run's `Schedules`, never from a
constant of their own.

A step is as many micro-batches as it takes to complete it: with Accelerate, until its gradient
accumulation says the gradients are synchronised (grad_accum micro-batches, crossing an epoch
boundary when the epoch's count is not a multiple); without it (`OneProcess`), one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import torch

from lmim.train.config import effective_batch_size
from lmim.train.schedules import Schedules

if TYPE_CHECKING:  # the model (timm) loads when a run builds one, not when the trainer is imported
    from lmim.model import LatentMIM
    from lmim.pipeline.batch import Batch

__all__ = ["Stepper", "OneProcess", "train_step", "make_optimizer", "local_stepper"]


class Accumulator(Protocol):
    """The part of `accelerate.Accelerator` a step uses."""

    @property
    def sync_gradients(self) -> bool: ...

    def accumulate(self, model: Any) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> Any: ...


class OneProcess:
    """`Accumulator` for one process without Accelerate (the benchmarks): no accumulation, no loss
    scaling, no gradient all-reduce, so every micro-batch is a whole optimizer step."""

    sync_gradients = True

    def accumulate(self, model: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@dataclass
class Stepper:
    """What a step needs, built once per run (or per benchmark variant).

    Attributes:
        model: what runs the forward pass: `net`, or `net` compiled and/or prepared by Accelerate.
        net: the LatentMIM itself (its config, its EMA target).
        optimizer: over `net.param_groups` (Accelerate's wrapper in the trainer).
        schedules: lr, s* and EMA momentum as functions of the step.
        clip_grad: max gradient norm; 0 = no clipping.
        accelerator: Accelerate's (accumulation, mixed precision, DDP), or `OneProcess()`.
        autocast: run the forward under `torch.autocast` with this dtype; only without Accelerate,
            whose `prepare` already wraps the model's forward in its own autocast.
        ema: the target update, called with the step's momentum; default `net.update_target`
            (`lmim bench model` passes its naive per-parameter baseline here).
    """

    model: torch.nn.Module
    net: LatentMIM
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    clip_grad: float = 0.0
    accelerator: Accumulator = field(default_factory=OneProcess)
    autocast: torch.dtype | None = None
    ema: Callable[[float], None] | None = None


def make_optimizer(net: LatentMIM, optim_cfg: Any, lr: float) -> torch.optim.AdamW:
    """AdamW over `net.param_groups` (no decay on norms, biases, embeddings, tokens) per `optim_cfg`
    (TrainConfig.optim), fused into one kernel where torch has one for the device (CUDA, and the CPU
    since torch 2.4: half the per-parameter loop's time there, about 14 vs 28 ms a step on 4.7 M
    parameters on a 2-core EPYC), else torch's default implementation."""
    groups = net.param_groups(optim_cfg.weight_decay)
    options = dict(lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError):  # no fused kernel for these parameters' device or dtype
        return torch.optim.AdamW(groups, **options)


def train_step(s: Stepper, batches: Iterator[Batch], step: int, *, metrics: bool = False) -> list[dict[str, torch.Tensor]]:
    """Optimizer step `step` (0-based) on micro-batches drawn from `batches`.

    Args:
        metrics: the model's diagnostics too (an SVD that syncs a GPU): only for a step that writes a
            metrics record (`Cadence.records`: logged, checkpoint and k-NN steps).

    Returns:
        The model's outputs, one dict per micro-batch (`loss` still holds its graph's result;
        callers detach what they keep).
    """
    acc = s.accelerator
    # The values of this step (pure functions of it), the same for each of its micro-batches.
    lr = s.schedules.lr(step)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    sim_target = s.schedules.sim_target(step) if s.net.cfg.sim_reg_coef > 0 else None
    outs = []
    while True:
        batch = next(batches)
        with acc.accumulate(s.model):
            with _autocast(s.autocast, batch.images.device):
                out = s.model(batch.images, batch.visible, batch.target, sim_target=sim_target, metrics=metrics)
            acc.backward(out["loss"])
            if acc.sync_gradients and s.clip_grad > 0:
                acc.clip_grad_norm_(s.model.parameters(), s.clip_grad)
            s.optimizer.step()  # Accelerate skips it (and zero_grad) on a micro-batch that only accumulates
            s.optimizer.zero_grad(set_to_none=True)
        outs.append(out)
        if acc.sync_gradients:
            break
    (s.ema or s.net.update_target)(s.schedules.momentum(step))  # once per step, after the update
    return outs


def _autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def local_stepper(cfg: Any, net: LatentMIM, *, steps_per_epoch: int,
                  autocast: torch.dtype | None = None) -> Stepper:
    """A Stepper for `net` on one process without Accelerate (the benchmarks' bare step), with
    TrainConfig `cfg`'s optimizer, schedules (at one process's effective batch) and clipping."""
    sched = Schedules.from_config(cfg, steps_per_epoch, effective_batch_size(cfg, 1))
    optimizer = make_optimizer(net, cfg.optim, sched.lr(0))
    return Stepper(net, net, optimizer, sched, clip_grad=float(cfg.optim.clip_grad), autocast=autocast)
