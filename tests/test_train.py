"""train/pretrain.py: the loop end to end, exact resume, atomic checkpoints, NaN stop (CPU, tiny)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmim.train.checkpoint import COMPLETE_MARKER, latest_checkpoint, list_checkpoints
from lmim.train.config import ConfigError, load_config
from lmim.train.observe import read_metrics

# A ViT small enough for a step in tens of milliseconds: 4x4 grid of 4 px patches, no gap.
TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "model.grid_size=4",
    "model.patch_gap=0", "model.projector_hidden_dim=64", "model.decoder_dim=32", "model.decoder_depth=1",
    "model.decoder_num_heads=2", "data.num_visible=4", "data.batch_size=8", "device=cpu", "precision=no",
    "log_with=[]", "progress=false", "plots=false", "log_every=1", "optim.warmup_epochs=1", "epochs=2",
]
SYNTHETIC = ["data.loader=synthetic", "synthetic_batches=5"]


def _run(run_dir, *extra):
    from lmim.train.pretrain import reset_accelerate_state, run

    reset_accelerate_state()
    cfg = load_config("quickstart", [*TINY, *SYNTHETIC, f"run_dir={run_dir}", *extra])
    return run(cfg)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def test_end_to_end_synthetic(tmp_path):
    out = _run(tmp_path / "r", "plots=true", "checkpoint.every_steps=4", "checkpoint.keep=2")
    assert out["step"] == 10 and out["steps_per_epoch"] == 5
    losses = _losses(tmp_path / "r")
    assert sorted(losses) == list(range(1, 11)) and all(math.isfinite(v) for v in losses.values())
    recs = read_metrics(tmp_path / "r" / "metrics.jsonl")
    # Schedules as logged: warm-up starts at 0.25 x peak, momentum rises towards 1.
    peak = 1.5e-3 * 8 / 256
    assert recs[0]["lr"] == pytest.approx(0.25 * peak)
    assert recs[-1]["momentum"] > recs[0]["momentum"]
    for key in ("collapse_cos", "effective_rank", "images_per_s", "data_wait_share"):
        assert key in recs[-1]
    # Rotation: steps 4, 8, 10 were saved, the newest two kept, each complete and self-describing.
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [8, 10]
    ckpt = latest_checkpoint(tmp_path / "r")
    for name in ("model.safetensors", "optimizer.bin", "rng_state_0.json", "config.yaml", COMPLETE_MARKER):
        assert (ckpt / name).is_file(), name
    assert (tmp_path / "r" / "plots" / "curves.png").stat().st_size > 0
    assert (tmp_path / "r" / "plots" / "masks.png").stat().st_size > 0
    # The checkpoint contract: lmim.tools.export rebuilds the model from it with plain keys.
    from lmim.tools.export import load_latent_mim

    net = load_latent_mim(ckpt)
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == set(net.state_dict()) and not any(k.startswith("module.") for k in saved)


@pytest.mark.parametrize("overrides, reason", [
    (["model.num_heads=null"], "dim should be divisible by num_heads"),   # vit_tiny's 3 heads, embed_dim 32
    (["model.arch=vit_base_patch16_reg4_gap_256"], "no register tokens"),
])
def test_a_model_timm_cannot_build_is_a_config_error_and_writes_nothing(tmp_path, overrides, reason):
    """Settings that pass the load-time checks but that timm refuses when it builds the encoder: one
    sentence naming the model.* keys and timm's reason (exit 2), before the run folder is written."""
    with pytest.raises(ConfigError) as info:
        _run(tmp_path / "r", *overrides)
    msg = str(info.value)
    assert msg.startswith("Cannot build the model from model.arch=") and reason in msg, msg
    assert "model.num_heads=" in msg and "\n" not in msg and msg.endswith("."), msg
    assert not (tmp_path / "r").exists()


def test_the_synthetic_loader_gives_model_in_chans_channels(tmp_path):
    """model.in_chans != 3 is refused with the image pipelines (always RGB), so data.loader=synthetic,
    the one loader it is allowed with, must give that many channels."""
    assert _run(tmp_path / "r", "model.in_chans=1", "max_steps=1")["step"] == 1


def test_settings_that_do_less_than_they_say_are_told_at_start(tmp_path, capsys):
    """max_steps beyond the schedule is capped, and k-NN monitoring without data.eval_url never runs:
    both are valid, and each is said in one line at the start instead of silently."""
    out = _run(tmp_path / "r", "epochs=1", "max_steps=50", "eval.knn_every_epochs=1")
    assert out["step"] == 5
    printed = capsys.readouterr().out
    assert ("max_steps=50 is beyond the schedule's 5 steps (epochs=1 x 5 steps per epoch): the run stops at step 5; "
            "raise epochs") in printed
    assert "no k-NN evaluation: eval.knn_every_epochs=1 but data.loader=synthetic has no labelled split" in printed
    _run(tmp_path / "r2", "max_steps=3", "eval.knn_every_epochs=0")
    printed = capsys.readouterr().out
    assert "beyond the schedule" not in printed and "no k-NN evaluation" not in printed


def test_knn_monitoring_without_an_eval_split_says_how_to_get_one():
    from lmim.train.pretrain import _say_what_will_not_happen

    class Printer:
        lines: list[str] = []

        def print(self, line: str) -> None:
            self.lines.append(line)

    printer = Printer()
    _say_what_will_not_happen(load_config("quickstart", ["eval.knn_every_epochs=2"]), printer, 5, 50)
    assert printer.lines == ["no k-NN evaluation: eval.knn_every_epochs=2 but data.eval_url is not set; set "
                             "data.eval_url to a labelled split (as the vit_*_in1k presets' example commands do) to "
                             "monitor k-NN top-1"]


def test_stop_then_resume_is_exact(tmp_path):
    """A run stopped at max_steps and resumed logs exactly the losses of an uninterrupted run."""
    _run(tmp_path / "a")
    _run(tmp_path / "b", "max_steps=3", "checkpoint.every_steps=100")
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(newest: step_00000003\); add resume=auto"):
        _run(tmp_path / "b")
    out = _run(tmp_path / "b", "resume=auto")
    assert out["step"] == 10
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(b) == sorted(a)
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    # Same final weights too (online and EMA target).
    from safetensors.torch import load_file

    wa = load_file(str(latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_checkpoint_is_ignored(tmp_path):
    run_dir = tmp_path / "r"
    _run(run_dir, "max_steps=4", "checkpoint.every_steps=2")
    good = latest_checkpoint(run_dir)
    assert good.name == "step_00000004"
    root = run_dir / "checkpoints"
    # A write cut short before the rename (temp folder) and a step folder without its marker.
    tmp = root / ".tmp-step_00000006"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    bad = root / "step_00000008"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(run_dir) == good
    out = _run(run_dir, "resume=auto", "max_steps=6")
    assert out["step"] == 6
    assert not tmp.exists()  # the leftover was cleaned up
    # Resumed from step 4, not from the broken step 8: steps 5 and 6 equal an uninterrupted run's.
    _run(tmp_path / "ref", "max_steps=6", "checkpoint.every_steps=2")
    assert _losses(run_dir) == _losses(tmp_path / "ref")


def poison_loss(monkeypatch, from_step: int) -> None:
    """Make the loss nan from the `from_step`-th forward pass on (a divergence, on demand)."""
    from lmim.model.latent_mim import LatentMIM

    real_forward = LatentMIM.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] >= from_step:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(LatentMIM, "forward", poisoned)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from lmim.train.pretrain import TrainingError

    poison_loss(monkeypatch, from_step=5)
    with pytest.raises(TrainingError, match=r"non-finite \(nan/inf\) at step 5; .*last good checkpoint is kept"):
        _run(tmp_path / "r", "checkpoint.every_steps=4", "log_every=5")
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [4]
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["status"] == "failed"
    # before any checkpoint: no checkpoint to resume from, and the lr key the run actually uses
    with pytest.raises(TrainingError, match=r"between steps 1 and 3; training stopped and no checkpoint was written "
                                            r"yet: start again with a lower optim.lr or precision=no"):
        _run(tmp_path / "r2", "log_every=3", "optim.lr=0.001")


def test_an_epoch_without_batches_is_an_error_not_a_hang():
    """A loader that gives nothing for a whole epoch would give nothing forever: stop with one sentence."""
    from lmim.pipeline.errors import DataError
    from lmim.train.meter import Meter
    from lmim.train.pretrain import _epochs

    batches = _epochs([], Meter(8, start_step=0, stop_step=10))
    with pytest.raises(DataError, match="no batch for a whole epoch"):
        next(batches)


def test_resume_with_another_grad_accum_keeps_the_epochs_and_the_newest_checkpoint_is_the_last_written(tmp_path):
    """grad_accum 1 -> 2 on resume halves the steps per epoch: the step counter moves back to the same
    point of training (so the run still trains `epochs` epochs, not half of them), and the checkpoints
    it then writes, with lower steps than the one it resumed from, are the newest: resume=auto and
    checkpoint.keep follow the order they were written in, not the step in their names."""
    from lmim.train.checkpoint import latest_checkpoint, list_checkpoints

    run = tmp_path / "r"
    ten = ["synthetic_batches=10", "checkpoint.every_steps=4", "checkpoint.keep=2"]  # 10 steps per epoch, 20 in all
    first = _run(run, *ten, "max_steps=8")
    assert first["step"] == 8                                       # epoch 0, batch 8 of 10
    second = _run(run, *ten, "grad_accum=2", "max_steps=7", "resume=auto")
    # 5 steps per epoch now: step 8 becomes 4 (the same point, rounded down to whole steps), then 3 more
    assert second["step"] == 7 and second["steps_per_epoch"] == 5
    assert [step for step, _ in list_checkpoints(run)] == [8, 7]     # written in that order; step_4 rotated out
    assert latest_checkpoint(run).name == "step_00000007"
    third = _run(run, *ten, "grad_accum=2", "resume=auto")
    assert third["step"] == 10                                      # 2 epochs of 5 steps: the whole run, not 20
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == [*range(1, 9), *range(5, 11)]                   # 8 steps of 1 batch, then 6 of 2: 20 batches
    epochs = [r["epoch"] for r in logged if "loss" in r]
    assert epochs == sorted(epochs) and epochs[-1] == 2.0           # the data's epoch never goes back
    # The optimizer-step count never goes back either: it is the x-axis of the trackers and plots, and
    # what keys read_metrics, which keeps both runs' records (by step it would merge steps 5-8 of the two).
    assert [r["update"] for r in logged if "loss" in r] == list(range(1, 15))
    kept = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in kept] == steps and [r["images_seen"] for r in kept][-1] == 20 * 8  # 20 batches of 8


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(tmp_path, capsys):
    _run(tmp_path / "r")
    capsys.readouterr()
    again = _run(tmp_path / "r", "resume=auto")
    assert again["step"] == 10
    assert "nothing left to train: the checkpoint is at step 10 and this run stops at step 10" in capsys.readouterr().out
    longer = _run(tmp_path / "r", "resume=auto", "epochs=3")
    assert longer["step"] == 15 and "nothing left" not in capsys.readouterr().out
    # Another run's finished checkpoint into a new folder: the summary names that checkpoint (the
    # model's state), not whatever this folder held
    other = _run(tmp_path / "new", f"resume={again['checkpoint']}")
    assert other["step"] == 10 and other["checkpoint"] == again["checkpoint"]
    status = json.loads((tmp_path / "new" / "status.json").read_text())
    assert status["last_checkpoint"] == str(Path(again["checkpoint"]).resolve())


def test_metrics_jsonl_is_strict_json_with_undefined_values_as_null(tmp_path):
    """A 1-image batch has no cross-image similarity (NaN): the line must still be JSON that strict
    readers accept, so the value is written as null."""
    from lmim.train.observe import MetricsWriter

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    log = MetricsWriter(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": 1.5, "collapse_cos": float("nan"), "x": float("inf")})
    log.close()
    record = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=refuse)
    assert record == {"step": 1, "loss": 1.5, "collapse_cos": None, "x": None}


def test_read_metrics_keeps_the_later_of_a_redone_point_and_reads_records_of_an_older_lmim(tmp_path):
    """A run killed after its last checkpoint redoes those steps when resumed: the later record of a
    point wins. Records written before the update count existed are keyed by their step, and a record
    that is not an object (a hand edit) is passed over, not a crash of the end-of-run plots."""
    lines = [
        {"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0},                             # an older lmim
        {"step": 3, "update": 3, "loss": 7.0}, {"step": 4, "update": 4, "loss": 6.5},   # killed after 3
        {"step": 4, "update": 4, "loss": 6.0},                                          # redone on resume
        {"step": 2, "update": 5, "loss": 5.0},                                          # rebased: step 2 again
        [1, 2], {"event": "note"},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 6, \"lo")   # the last line cut by a kill
    recs = read_metrics(path)
    assert [(r.get("step"), r.get("loss")) for r in recs] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (2, 5.0),
                                                             (None, None)]


def test_a_record_written_at_a_checkpoint_step_carries_the_diagnostics(tmp_path):
    """The window is also closed at checkpoint steps (a non-finite loss must stop the run before its
    weights are saved); that record used to lack the collapse diagnostics, which were computed only on
    log_every steps, so the guard read NaN there and the curves had holes."""
    _run(tmp_path / "r", "log_every=5", "checkpoint.every_steps=2", "max_steps=4")
    recs = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [2, 4]
    assert all(r.get("collapse_cos") is not None and "effective_rank" in r for r in recs)


def test_the_collapse_guard_warns_once_an_episode_and_its_stop_ends_the_run_keeping_the_checkpoint(tmp_path):
    """collapse_guard: past `after_epochs`, `patience` logged steps above `threshold` give one loud
    warning (also in metrics.jsonl) and the run goes on; with action=stop the run ends there instead,
    as a divergence (exit 1), naming the checkpoint it keeps. The threshold is set below any cosine
    so that the tiny model's real diagnostics cross it from the first step."""
    from lmim.train.failures import classify
    from lmim.train.pretrain import TrainingError

    guard = ["collapse_guard.after_epochs=0", "collapse_guard.threshold=-1.5", "collapse_guard.patience=2"]
    out = _run(tmp_path / "warn", *guard)
    assert out["step"] == 10                                     # a warning does not stop the run
    events = [r for r in read_metrics(tmp_path / "warn" / "metrics.jsonl") if r.get("event") == "collapse_warning"]
    assert [e["step"] for e in events] == [2]                    # once, when the patience ran out
    assert "collapse_cos" in events[0]["message"]

    with pytest.raises(TrainingError, match=r"collapse_guard\.action=stop.*step_00000001") as stopped:
        _run(tmp_path / "stop", *guard, "collapse_guard.action=stop", "checkpoint.every_steps=1")
    assert (classify(stopped.value).code, classify(stopped.value).kind) == (1, "diverged")
    status = json.loads((tmp_path / "stop" / "status.json").read_text())
    assert (status["status"], status["step"], status["exit_code"]) == ("failed", 2, 1)
    assert Path(status["last_checkpoint"]).name == "step_00000001"


def test_wandb_asked_for_where_it_is_not_installed_is_a_bad_setting_that_writes_nothing(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"log_with includes 'wandb' but wandb is not installed"):
        _run(tmp_path / "r", "log_with=[wandb]")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
