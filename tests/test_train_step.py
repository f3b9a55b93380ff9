"""The loop's pieces alone: train_step (schedules, accumulation, EMA), Meter (windows, wait, timing), Cadence."""
from __future__ import annotations

import contextlib
import itertools
import math
import time

import pytest
import torch

from lmim.model import LatentMIM
from lmim.pipeline.batch import Batch
from lmim.train.cadence import Cadence
from lmim.train.config import load_config
from lmim.train.meter import Meter
from lmim.train.schedules import Schedules
from lmim.train.step import OneProcess, local_stepper, train_step
from tests.test_model import batch, tiny

SCHED = Schedules(peak_lr=1e-3, total_steps=10, warmup_steps=2, ema_start=0.9, ema_end=1.0)


def _net(**kw) -> LatentMIM:
    torch.manual_seed(0)
    return LatentMIM(tiny(patch_gap=0, **kw))


def _batches(net: LatentMIM) -> itertools.repeat:
    return itertools.repeat(Batch(*batch(net.cfg, b=2, gap=False)))


def _stepper(net: LatentMIM, **kw):
    cfg = load_config("quickstart", ["optim.clip_grad=0.5"])
    s = local_stepper(cfg, net, steps_per_epoch=5)
    s.schedules = SCHED
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_train_step_uses_the_schedules_and_updates_the_target_once():
    net = _net()
    stepper = _stepper(net)
    momenta = []
    stepper.ema = lambda m: (momenta.append(m), net.update_target(m))
    online_before = net.encoder.blocks[0].attn.qkv.weight.detach().clone()
    outs = train_step(stepper, _batches(net), 3, metrics=True)
    assert len(outs) == 1 and "collapse_cos" in outs[0]             # one micro-batch, diagnostics asked for
    assert all(g["lr"] == SCHED.lr(3) for g in stepper.optimizer.param_groups)
    assert momenta == [SCHED.momentum(3)]
    assert not torch.equal(net.encoder.blocks[0].attn.qkv.weight, online_before)
    assert set(train_step(stepper, _batches(net), 4)[0]) == {"loss", "loss_pred", "loss_sim"}


def test_train_step_clips_with_the_configured_norm():
    net = _net()
    seen = []

    class Spy(OneProcess):
        def clip_grad_norm_(self, parameters, max_norm):
            seen.append(max_norm)
            return super().clip_grad_norm_(parameters, max_norm)

    train_step(_stepper(net, accelerator=Spy()), _batches(net), 0)
    assert seen == [0.5]


def test_train_step_takes_micro_batches_until_the_gradients_sync():
    """With accumulation (Accelerate's interface), one step draws micro-batches until sync_gradients."""

    class EveryThird(OneProcess):
        def __init__(self):
            self.calls = 0

        @property
        def sync_gradients(self) -> bool:
            return self.calls % 3 == 0

        def accumulate(self, model):
            self.calls += 1
            return contextlib.nullcontext()

    net = _net()
    source = _batches(net)
    drawn = []
    counted = (drawn.append(b) or b for b in source)
    outs = train_step(_stepper(net, accelerator=EveryThird()), counted, 0)
    assert len(outs) == len(drawn) == 3


def test_train_step_passes_s_star_only_when_the_regulariser_is_on():
    net = _net(sim_reg_coef=0.1)
    out = train_step(_stepper(net), _batches(net), 2)[0]  # the model refuses a missing s*
    assert torch.isclose(out["loss"], out["loss_pred"] + 0.1 * out["loss_sim"])


def test_meter_window_averages_and_flags_a_nonfinite_loss():
    meter = Meter(images_per_step=8, start_step=0, stop_step=100)
    assert meter.window(lambda t: t) is None                     # nothing logged yet
    t = torch.tensor
    meter.add_step([{"loss": t(1.0), "x": t(2.0)}, {"loss": t(3.0), "x": t(4.0)}], step=1)  # two micro-batches
    meter.add_step([{"loss": t(5.0), "x": t(6.0)}], step=2)
    w = meter.window(lambda v: v)
    assert (w.steps, w.loss, w.metrics, w.nonfinite) == (2, 3.5, {"x": 4.0}, False)  # step means 2 and 5
    assert w.images_per_s > 0 and 0 <= w.data_wait_share <= 1
    assert meter.window(lambda v: v) is None                     # the window was closed
    meter.add_step([{"loss": t(float("nan"))}], step=3)
    assert meter.window(lambda v: v).nonfinite


def test_meter_counts_the_wait_for_batches_not_the_epochs_end():
    meter = Meter(images_per_step=1, start_step=0, stop_step=1)

    def slow_epoch():
        time.sleep(0.05)
        yield "a"
        time.sleep(0.2)  # after the last batch: noticing the epoch's end is not a batch's wait

    assert list(meter.timed(slow_epoch())) == ["a"]
    meter.add_step([{"loss": torch.tensor(1.0)}], step=1)
    w = meter.window(lambda v: v)
    assert 0 < w.data_wait_share < 0.5     # ~0.05 s of ~0.25 s; counting the end would make it ~1
    summary = meter.summary(1)
    assert summary is not None and summary["steps"] == 1 and 0 < summary["data_wait_share"] < 0.5


def test_meter_times_the_run_after_its_warmup_steps():
    meter = Meter(images_per_step=4, start_step=10, stop_step=20)
    assert meter.timing_from == 13
    for step in range(11, 21):
        meter.add_step([{"loss": torch.tensor(0.0)}], step=step)
    s = meter.summary(20)
    assert s["steps"] == 7 and math.isclose(s["images_per_s"], 4 * s["steps_per_s"])
    assert Meter(images_per_step=4, start_step=5, stop_step=5).summary(5) is None   # nothing to time


def test_cadence():
    cfg = load_config("quickstart", ["log_every=4", "checkpoint.every_steps=6", "eval.knn_every_epochs=2",
                                     "data.eval_url=somewhere", "max_steps=15"])
    c = Cadence.from_config(cfg, steps_per_epoch=5, total_steps=100)
    assert c.stop_step == 15 and not c.done(14) and c.done(15)
    assert [s for s in range(1, 16) if c.logs(s)] == [4, 8, 12, 15]
    assert [s for s in range(1, 16) if c.evaluates(s)] == [10, 15]
    assert [s for s in range(1, 16) if c.checkpoints(s)] == [6, 12, 15]
    assert [s for s in range(1, 16) if c.records(s)] == [4, 6, 8, 10, 12, 15]   # every one with the diagnostics
    quiet = Cadence.from_config(load_config("quickstart", ["checkpoint.every_steps=0", "eval.knn_every_epochs=1"]),
                                steps_per_epoch=5, total_steps=10)
    assert not any(quiet.evaluates(s) for s in range(1, 11))        # no labelled split: never
    assert [s for s in range(1, 11) if quiet.checkpoints(s)] == [10]  # 0: only at the end


@pytest.mark.parametrize("objective", ["mae", "naive_mse"])
def test_train_step_without_an_ema_target(objective):
    net = _net(objective=objective)
    assert math.isfinite(train_step(_stepper(net), _batches(net), 0)[0]["loss"].item())
