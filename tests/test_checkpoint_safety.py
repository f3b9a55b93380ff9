"""Checkpoints that cannot hurt: nothing in one runs code, damage is found before loading, resume=auto
falls back past a damaged newest checkpoint, and exports are byte-reproducible."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train import _losses, _run
from lmim.train.checkpoint import COMPLETE_MARKER, CheckpointError, latest_checkpoint, list_checkpoints, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this writes a file: the proof that a loader executed code from a checkpoint."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return (Path.write_text, (self.proof, "pwned"))


def _write_crafted_pickle(path: Path, proof: Path, rehash: bool = True) -> None:
    with open(path, "wb") as f:
        pickle.dump({"step": _Payload(proof)}, f)
    if rehash:  # an attacker rewrites the marker too, so the digests match the crafted file
        ckpt = path.parent
        marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
        from lmim.pipeline.format.checksum import checksum_of_file

        marker.setdefault("files", {})[path.name] = {"bytes": path.stat().st_size, "checksum": checksum_of_file(str(path))}
        (ckpt / COMPLETE_MARKER).write_text(json.dumps(marker))


def test_checkpoint_states_are_json_and_every_file_is_digested(tmp_path):
    _run(tmp_path / "r", "max_steps=3", "checkpoint.every_steps=100")
    ckpt = latest_checkpoint(tmp_path / "r")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    assert json.loads((ckpt / "loader_state.json").read_text())["world_size"] == 1
    assert not list(ckpt.glob("custom_checkpoint_*.pkl"))
    files = json.loads((ckpt / COMPLETE_MARKER).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "config.yaml", "trainer_state.json"} <= set(files)
    verify_checkpoint(ckpt)
    data = bytearray((ckpt / "optimizer.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (ckpt / "optimizer.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="the bytes of optimizer.bin changed"):
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("target", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_resuming_never_executes_code_from_a_checkpoint(tmp_path, target):
    run_dir = tmp_path / "r"
    _run(run_dir, "max_steps=3", "checkpoint.every_steps=100")
    ckpt = latest_checkpoint(run_dir)
    proof = tmp_path / "proof.txt"
    if target == "custom_checkpoint_0.pkl":  # how earlier versions stored the trainer state
        (ckpt / "trainer_state.json").unlink()
        marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
        del marker["files"]["trainer_state.json"]
        (ckpt / COMPLETE_MARKER).write_text(json.dumps(marker))
    _write_crafted_pickle(ckpt / target, proof)
    try:
        _run(run_dir, "resume=auto", "max_steps=4")
    except CheckpointError as err:
        assert str(ckpt) in str(err)
        assert "weights_only=False" not in str(err)   # never advise the one setting that runs the pickle
    assert not proof.exists(), f"loading {target} ran code from the checkpoint"


def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "r"
    _run(run_dir, "max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=3")
    newest = latest_checkpoint(run_dir)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk or a cut copy
    out = _run(run_dir, "resume=auto")
    assert out["step"] == 10
    printed = capsys.readouterr()
    assert "step_00000006 is damaged: model.safetensors has 1000 bytes" in printed.err   # the warning
    assert "resumed from" in printed.out and "step_00000004" in printed.out
    # Resumed exactly from step 4: every later loss equals an uninterrupted run's.
    _run(tmp_path / "ref")
    ref, got = _losses(tmp_path / "ref"), _losses(run_dir)
    assert all(got[s] == ref[s] for s in ref)


def test_a_damaged_checkpoint_passed_over_is_set_aside_not_kept_in_place_of_a_good_one(tmp_path, capsys):
    run_dir = tmp_path / "r"
    _run(run_dir, "max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep=2")   # step_3, step_6
    damaged = latest_checkpoint(run_dir)
    (damaged / "optimizer.bin").write_bytes(b"")
    # Resumed from step_3 and stopped at step 4: keep=2 must keep step_3 (good) and step_4, not the
    # damaged step_6 written before them and step_4 (rotation goes by write order).
    _run(run_dir, "resume=auto", "max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=2")
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 4]
    aside = run_dir / "checkpoints" / "damaged-step_00000006"
    assert (aside / "optimizer.bin").stat().st_size == 0   # kept as it was, for a person to inspect
    assert "step_00000006 is damaged; moved aside to damaged-step_00000006" in capsys.readouterr().err
    # Damaged again at the same step later: the earlier one is not overwritten.
    _run(run_dir, "resume=auto", "max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=2")
    (latest_checkpoint(run_dir) / "model.safetensors").write_bytes(b"")
    _run(run_dir, "resume=auto", "max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=2")
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("damaged-*")) == [
        "damaged-step_00000006", "damaged-step_00000006-2"]


def test_a_checkpoint_that_could_not_be_read_is_passed_over_but_not_called_damaged(tmp_path, capsys, monkeypatch):
    """A read error (EIO on a flaky disk) is no proof of damage: resume=auto falls back, but leaves the
    checkpoint where it is for the next start."""
    import errno

    from lmim.train import checkpoint as ckpt_module

    run_dir = tmp_path / "r"
    _run(run_dir, "max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep=3")
    newest = latest_checkpoint(run_dir)
    real = ckpt_module.checksum_of_file

    def flaky(path, *args, **kwargs):
        if newest.name in str(path):
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "checksum_of_file", flaky)
    _run(run_dir, "resume=auto", "max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=3")
    err = capsys.readouterr().err
    assert "step_00000006" in err and "cannot be read (Input/output error)" in err
    assert newest.is_dir() and not list((run_dir / "checkpoints").glob("damaged-*"))


def test_no_loadable_checkpoint_is_one_sentence_and_exit_code_3(tmp_path):
    run_dir = tmp_path / "r"
    _run(run_dir, "max_steps=4", "checkpoint.every_steps=2")
    for _, ckpt in list_checkpoints(run_dir):
        (ckpt / "optimizer.bin").write_bytes(b"")
    from tests.test_train import SYNTHETIC, TINY

    config = (run_dir / "config.yaml").read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", *TINY, *SYNTHETIC,
                           f"run_dir={run_dir}", "resume=auto", "max_steps=6"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert (run_dir / "config.yaml").read_text() == config   # the failed start did not rewrite the run's config
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lmim pretrain: none of the 2 checkpoints") and "optimizer.bin has 0 bytes" in last
    assert "Traceback" not in proc.stderr
    # Every checkpoint it skipped is named with its reason, the oldest too.
    skipped = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: skipping")]   # warnings: stderr
    assert [ln.split()[2] for ln in skipped] == ["step_00000004:", "step_00000002:"]
    assert all("optimizer.bin has 0 bytes" in ln for ln in skipped)


def _export(ckpt: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lmim.tools.cli", "export", str(ckpt), str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_export_is_byte_reproducible_and_refuses_a_damaged_checkpoint(tmp_path):
    _run(tmp_path / "r", "max_steps=2", "checkpoint.every_steps=100")
    ckpt = latest_checkpoint(tmp_path / "r")
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for out in outs:  # two processes: safetensors' metadata order used to differ between them
        proc = _export(ckpt, out)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert outs[0].read_bytes() == outs[1].read_bytes()
    from lmim.tools.export import load_encoder

    assert sum(p.numel() for p in load_encoder(outs[0]).parameters()) > 0
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    proc = _export(ckpt, tmp_path / "c.safetensors")
    assert proc.returncode == 2 and "model.safetensors has" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c.safetensors").exists()


def test_rng_states_round_trip_through_json(tmp_path):
    """Every RNG the trainer draws from is restored from the checkpoint's JSON (exact resume)."""
    import random

    import numpy as np
    import torch

    from lmim.train.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state()))  # through text, as on disk
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 10**6, (1,)).item())
    set_rng_state(saved)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 10**6, (1,)).item())
    assert first == again
    _run(tmp_path / "r", "max_steps=2", "checkpoint.every_steps=100")
    ckpt = latest_checkpoint(tmp_path / "r")
    assert (ckpt / "rng_state_0.json").is_file() and not (ckpt / "random_states_0.pkl").exists()


def _replace_and_rehash(path: Path, text: str) -> None:
    """Write `text` to a checkpoint file and its new size and checksum into the marker, as a checkpoint
    edited by hand or written by another version would look: the digests match, the content is wrong."""
    path.write_text(text)
    from lmim.pipeline.format.checksum import checksum_of_file

    marker = json.loads((path.parent / COMPLETE_MARKER).read_text())
    marker["files"][path.name] = {"bytes": path.stat().st_size, "checksum": checksum_of_file(str(path))}
    (path.parent / COMPLETE_MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("name, text", [
    ("trainer_state.json", "[1, 2]"),
    ("trainer_state.json", '{"step": "abc", "micro_step": 0, "images_seen": 0, "world_size": 1, "history": {}}'),
    ("loader_state.json", '{"world_size": 1, "states": []}'),
    ("loader_state.json", '{"world_size": 0, "states": []}'),
    (COMPLETE_MARKER, "[1]"),
])
def test_a_checkpoint_state_of_the_wrong_shape_is_skipped_by_resume_auto(tmp_path, capsys, name, text):
    """Valid JSON of the wrong shape in the newest checkpoint (digests rewritten to match): resume=auto
    names it and goes back to the previous checkpoint, as for any other damage, instead of crashing."""
    run_dir = tmp_path / "r"
    _run(run_dir, "max_steps=4", "checkpoint.every_steps=2")
    newest = latest_checkpoint(run_dir)
    if name == COMPLETE_MARKER:
        (newest / name).write_text(text)
    else:
        _replace_and_rehash(newest / name, text)
    capsys.readouterr()
    out = _run(run_dir, "resume=auto", "max_steps=5")
    assert out["step"] == 5
    printed = capsys.readouterr()
    assert f"warning: skipping {newest.name}" in printed.err
    assert "resumed from" in printed.out and "step_00000002" in printed.out


@pytest.mark.parametrize("compiled_first", [True, False])
def test_compile_on_or_off_does_not_change_what_a_checkpoint_holds(tmp_path, compiled_first):
    """compile=true wraps the model in torch.compile's OptimizedModule, whose state dict keys carry
    `_orig_mod.`: a checkpoint of a compiled run used to load only into a compiled run (and the other
    way round), reported as a damaged checkpoint. Both now save and load the bare LatentMIM keys.
    (torch.compile's eager backend: the wrapper is the same as Inductor's, without a C++ compiler.)"""
    import torch
    from accelerate import Accelerator
    from safetensors import safe_open

    from lmim.model import LatentMIM
    from lmim.train.checkpoint import install_unwrapped_model_hooks, load_checkpoint, save_checkpoint
    from lmim.train.pretrain import reset_accelerate_state
    from tests.test_export import _tiny

    def prepared(compiled: bool, seed: int):
        reset_accelerate_state()
        acc = Accelerator(cpu=True)
        install_unwrapped_model_hooks(acc)
        torch.manual_seed(seed)
        net = LatentMIM(_tiny())
        model = torch.compile(net, backend="eager") if compiled else net
        model, opt = acc.prepare(model, torch.optim.AdamW(net.parameters()))
        return acc, net

    acc, saved_net = prepared(compiled_first, seed=0)
    ckpt = save_checkpoint(acc, tmp_path / "r", 1, "{}\n", keep=2)
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(saved_net.state_dict()) and not any(k.startswith("_orig_mod.") for k in keys)
    acc, loaded_net = prepared(not compiled_first, seed=1)
    load_checkpoint(acc, ckpt, states={})
    assert all(torch.equal(a, b) for a, b in zip(saved_net.state_dict().values(), loaded_net.state_dict().values()))


@pytest.mark.parametrize("damaged", ["step_00000008", "step_00000005"])
def test_a_checkpoint_with_an_unreadable_marker_keeps_its_place_in_writing_order(tmp_path, damaged):
    """After a resume that moved the step counter back, step_5 was written after step_8. A damaged
    marker must not move a checkpoint by its step: a damaged step_8 stays the oldest (rotated out
    first), a damaged step_5 stays the newest (tried first by resume=auto, and named)."""
    root = tmp_path / "checkpoints"
    for seq, (name, written) in enumerate((("step_00000004", 100), ("step_00000008", 200), ("step_00000005", 300)), 1):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"weights")
        os.utime(root / name / "model.safetensors", (written, written))
        (root / name / COMPLETE_MARKER).write_text(json.dumps({"step": int(name[5:]), "sequence": seq, "files": {}}))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8, 5]
    (root / damaged / COMPLETE_MARKER).write_text("garbage")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8, 5]


def test_a_trainer_state_from_before_the_update_count_counts_its_steps_as_updates():
    """Checkpoints of an older lmim record no `updates`: their step is the best count there is (exact
    unless that run was itself resumed on fewer steps per epoch), so the metrics of a run resumed
    from one go on from there, not from 0."""
    from lmim.train.checkpoint import TrainState

    state = TrainState()
    state.load_state_dict({"step": 40, "micro_step": 80, "images_seen": 640, "world_size": 1, "history": {}})
    assert (state.step, state.updates) == (40, 40)
    state.load_state_dict({**state.state_dict(), "step": 12, "updates": 40})   # a rebased run's own state
    assert (state.step, state.updates) == (12, 40)


def test_weights_of_another_model_are_skipped_with_the_tensor_that_differs(tmp_path, capsys):
    """model.safetensors of another model under the same config (digests rewritten): the skip said only
    "(RuntimeError: Error(s) in loading state_dict for LatentMIM:)", torch's first line; it names the
    mismatch now."""
    from safetensors.torch import load_file, save_file

    from lmim.pipeline.format.checksum import checksum_of_file

    run_dir = tmp_path / "r"
    _run(run_dir, "max_steps=4", "checkpoint.every_steps=2")
    newest = latest_checkpoint(run_dir)
    weights = load_file(str(newest / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.dim() == 2)
    weights[name] = weights[name][:, :-1].contiguous()          # one tensor of another shape
    save_file(weights, str(newest / "model.safetensors"))
    marker = json.loads((newest / COMPLETE_MARKER).read_text())
    path = newest / "model.safetensors"
    marker["files"][path.name] = {"bytes": path.stat().st_size, "checksum": checksum_of_file(str(path))}
    (newest / COMPLETE_MARKER).write_text(json.dumps(marker))
    capsys.readouterr()
    _run(run_dir, "resume=auto", "max_steps=5")
    err = capsys.readouterr().err
    assert f"warning: skipping {newest.name}" in err and "size mismatch for" in err, err


def test_a_step_folder_without_its_marker_is_named_when_resume_auto_passes_over_it(tmp_path, capsys):
    """A `step_N` folder without complete.json (a copy cut short) was passed over silently, though every
    checkpoint resume=auto skips is named."""
    run_dir = tmp_path / "r"
    _run(run_dir, "max_steps=4", "checkpoint.every_steps=2")
    newest = latest_checkpoint(run_dir)
    (newest / COMPLETE_MARKER).unlink()
    capsys.readouterr()
    out = _run(run_dir, "resume=auto", "max_steps=5")
    assert out["step"] == 5
    err = capsys.readouterr().err
    assert f"warning: skipping {newest.name}: it has no {COMPLETE_MARKER}" in err
