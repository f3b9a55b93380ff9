"""`lmim pretrain` failures a user meets: one sentence on stderr, a documented exit code, no
traceback, and nothing written into the run folder by a start that failed."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pipeline import make_dataset
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def _pretrain(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", *TINY,
                           "data.loader=dali", "data.num_threads=1", *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _one_sentence(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("lmim pretrain:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("fail") / "ds"), n=12, per_shard=6)


def test_missing_dataset_is_a_data_error_and_leaves_no_run_folder(tmp_path):
    proc = _pretrain(f"data.url={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 4
    line = _one_sentence(proc)
    assert "the data cannot be read: no manifest.json at" in line and "lmim shard" in line
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_the_dataset_is_a_data_error(small_dataset, tmp_path):
    proc = _pretrain(f"data.url={small_dataset}", "data.batch_size=64", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 4
    assert "larger than the dataset (12 samples" in _one_sentence(proc)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_corrupt_manifest_is_a_data_error(small_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(small_dataset, ds)
    (ds / "manifest.json").write_text('{"format": "lmim-shards", "shards": [')
    proc = _pretrain(f"data.url={ds}", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 4 and "manifest.json is not valid JSON" in _one_sentence(proc)


def test_an_unwritable_run_dir_is_a_config_error(small_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = _pretrain(f"data.url={small_dataset}", f"run_dir={blocker / 'run'}")
    assert proc.returncode == 2
    assert "cannot be written" in _one_sentence(proc) and "run_dir=PATH" in proc.stderr


def _raised_while_handling(err: BaseException, handled: BaseException) -> BaseException:
    """`err` as raised inside an `except` block handling `handled` (its __context__, not its cause)."""
    try:
        try:
            raise handled
        except type(handled):
            raise err
    except type(err) as raised:
        return raised


def _classify_cases():
    import errno

    from lmim.pipeline.errors import DatasetNotFound, ShardError, StoreUnreachable
    from lmim.train.checkpoint import CheckpointError
    from lmim.train.config import ConfigError
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    from lmim.train.pretrain import TrainingError

    wrapped = RuntimeError("listing failed")
    wrapped.__cause__ = ReadTimeoutError(endpoint_url="http://minio:9000")
    return [
        (TrainingError("The loss became non-finite"), 1, "diverged"),
        (ConfigError("Config key 'x' ..."), 2, "config"),
        (CheckpointError("checkpoint /r/step_1 is damaged"), 3, "checkpoint"),
        (DatasetNotFound("no manifest.json at /d"), 4, "data"),
        (ShardError("s-000.tar", "checksum mismatch"), 4, "data"),
        (StoreUnreachable("s-000.tar", "network error after 9 attempts"), 5, "storage"),
        (PermissionError("Forbidden"), 5, "storage"),
        (ConnectionResetError("reset by peer"), 5, "storage"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/manifest.json"), 5, "storage"),
        (wrapped, 5, "storage"),                       # raised from a client timeout
        (OSError(errno.ENOSPC, "No space left on device", "/runs/r/checkpoints/.tmp-step_8/optimizer.bin"), 6, "disk"),
        (PermissionError(errno.EACCES, "Permission denied", "/runs/r/metrics.jsonl"), 6, "disk"),
        (KeyboardInterrupt(), 130, "interrupted"),
        # another process of a launch went away mid-collective (NCCL's words; gloo's are met for real in
        # test_train_real.py); the same words from anything else are no collective's
        (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1968, remote process exited or there was a network error, "
                      "NCCL version 2.21.5"), 7, "peer"),
        (RuntimeError("Connection reset by peer"), 70, "bug"),
        (_raised_while_handling(ZeroDivisionError("division by zero"), RuntimeError(
            "[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:55013")), 70, "bug"),
        (ZeroDivisionError("division by zero"), 70, "bug"),
    ]


@pytest.mark.parametrize("err, code, kind", _classify_cases(), ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_every_failure_class_has_its_own_exit_code_and_one_sentence(err, code, kind):
    from lmim.train.failures import classify

    f = classify(err)
    assert (f.code, f.kind) == (code, kind)
    assert "\n" not in f.sentence and f.sentence
    if kind == "disk" and getattr(err, "filename", None):
        assert err.filename in f.sentence  # the full disk names the path
    if kind == "storage" and isinstance(err, PermissionError):
        assert "credentials" in f.sentence


def test_outside_training_a_dataset_that_cannot_be_used_is_bad_input():
    """README: the commands other than pretrain exit 2 for bad input (a dataset included), 5 for a
    store that does not answer; exit 4 is the trainer's."""
    from lmim.pipeline.errors import DatasetTooSmall, StoreUnreachable
    from lmim.train.failures import ONE_COMMAND, classify

    assert classify(DatasetTooSmall("batch 999 > 12 samples")).code == 4
    assert classify(DatasetTooSmall("batch 999 > 12 samples"), ONE_COMMAND).code == 2
    assert classify(StoreUnreachable("s-000.tar", "network error"), ONE_COMMAND).code == 5


def test_status_json_says_why_a_run_failed_and_where_its_last_checkpoint_is(tmp_path, monkeypatch):
    import json

    from tests.test_train import _run, poison_loss
    from lmim.train.pretrain import TrainingError

    poison_loss(monkeypatch, from_step=5)
    with pytest.raises(TrainingError):
        _run(tmp_path / "r", "checkpoint.every_steps=4", "log_every=5")
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["status"] == "failed" and status["kind"] == "diverged" and status["exit_code"] == 1
    assert "non-finite" in status["message"] and status["last_checkpoint"].endswith("step_00000004")
    assert not list((tmp_path / "r").glob(".status.json.tmp-*"))
    # config.yaml says precision: auto; status.json says what this machine got, and why
    setup = status["setup"]
    assert setup["precision"] in ("bf16", "no") and setup["precision_reason"].startswith("precision=")
    assert setup["threads"]["torch"] >= 1 and "for the loader" in setup["threads"]["reason"]
    assert setup["machine"].startswith("CPU ")


def test_status_json_follows_the_checkpoints_while_the_run_goes_on(tmp_path, monkeypatch):
    """A scheduler or a person reading status.json mid-run sees the last checkpoint, not step 0."""
    import json

    import lmim.train.pretrain as pretrain
    from tests.test_train import _run

    seen = []
    real = pretrain._write_status

    def record(run_dir, *args):   # the real writer runs; each status.json it leaves is kept
        real(run_dir, *args)
        seen.append(json.loads((run_dir / "status.json").read_text()))

    monkeypatch.setattr(pretrain, "_write_status", record)
    _run(tmp_path / "r", "checkpoint.every_steps=4")
    assert all(s["pid"] == os.getpid() and s["host"] for s in seen if s["status"] == "running")
    assert "pid" not in seen[-1]
    assert [(s["status"], s["step"], (s["last_checkpoint"] or "")[-13:]) for s in seen] == [
        ("running", 0, ""), ("running", 4, "step_00000004"), ("running", 8, "step_00000008"),
        ("running", 10, "step_00000010"), ("completed", 10, "step_00000010")]


def test_debug_prints_the_traceback_and_the_log_keeps_it(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = _pretrain(f"data.url={small_dataset}", f"run_dir={run_dir}", "max_steps=1", "checkpoint.every_steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = next((run_dir / "checkpoints").iterdir())
    (ckpt / "model.safetensors").write_bytes(b"")
    proc = _pretrain(f"data.url={small_dataset}", f"run_dir={run_dir}", "resume=auto", "max_steps=2")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "traceback: " in _one_sentence(proc) and (run_dir / "logs" / "error.log").is_file()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LMIM_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", *TINY, "data.loader=dali",
                           "data.num_threads=1", f"data.url={small_dataset}", f"run_dir={run_dir}", "resume=auto"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 3 and "Traceback" in proc.stderr and "CheckpointDamaged" in proc.stderr


def test_every_lmim_command_turns_an_expected_failure_into_one_sentence(tmp_path, monkeypatch, capsys):
    """The CLI's safety net: a full disk under the shard builder is a sentence naming the path, exit 6."""
    import errno

    import lmim.tools.shard.cli as shard_cli
    from lmim.tools.cli import main

    def full_disk(argv):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "shard-000003.tar"))

    monkeypatch.setattr(shard_cli, "main", full_disk)  # the disk cannot be filled for real in a test
    assert main(["shard", "src", str(tmp_path / "out")]) == 6
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmim shard: cannot write") and "shard-000003.tar" in err and "\n" not in err

    def bug(argv):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(shard_cli, "main", bug)
    assert main(["shard", "src", "dst"]) == 70      # a bug keeps its traceback, and exits 70
    assert "Traceback" in capsys.readouterr().err


def test_weights_that_really_diverge_stop_with_exit_1_not_a_crash(tmp_path):
    """A learning rate so large that the weights themselves become NaN (not a poisoned loss): the
    logged step's collapse diagnostics see NaN features, and the loss guard must still be what
    ends the run (exit 1, one sentence), with no checkpoint of the diverged weights."""
    run_dir = tmp_path / "r"
    proc = _pretrain("data.loader=synthetic", "synthetic_batches=3", "optim.base_lr=1e30", "log_every=2",
                     "checkpoint.every_steps=3", "eval.knn_every_epochs=1", f"run_dir={run_dir}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite" in _one_sentence(proc)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_effective_rank_of_non_finite_features_is_nan():
    import torch

    from lmim.model.losses import effective_rank

    x = torch.randn(8, 4)
    assert 1.0 <= float(effective_rank(x)) <= 4.0
    x[3, 1] = float("nan")
    assert torch.isnan(effective_rank(x))


def test_a_disk_that_fills_while_a_checkpoint_is_written_is_exit_6_and_leaves_no_partial_folder(tmp_path):
    """A real write failure, no mock: the process may write no file larger than 40 kB (RLIMIT_FSIZE,
    SIGXFSZ ignored), so the model's safetensors file fails mid-write with EFBIG, raised by the
    safetensors library as its own error type, not an OSError. The user must still read a disk
    failure (exit 6, one sentence naming the checkpoint folder), and no half-written folder stays."""
    run_dir = tmp_path / "r"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))\n"
        "from lmim.train.pretrain import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "--config", "quickstart", *TINY, "data.loader=synthetic",
                           "synthetic_batches=2", "max_steps=2", f"run_dir={run_dir}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 6, proc.stderr[-3000:]
    sentence = _one_sentence(proc)
    assert "cannot write" in sentence and "step_00000002" in sentence and "resume=auto" in sentence
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir()] if (run_dir / "checkpoints").exists() else []
    assert leftovers == []


def test_a_fresh_run_refused_from_another_runs_folder_leaves_that_folder_untouched(tmp_path):
    import json

    run_dir = tmp_path / "r"
    first = _pretrain("data.loader=synthetic", "synthetic_batches=2", "max_steps=2", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    status_before = (run_dir / "status.json").read_text()
    assert json.loads(status_before)["status"] == "completed"
    again = _pretrain("data.loader=synthetic", "synthetic_batches=2", "max_steps=2", f"run_dir={run_dir}")
    assert again.returncode == 2
    assert "already holds checkpoints" in _one_sentence(again) and "resume=auto" in _one_sentence(again)
    assert (run_dir / "status.json").read_text() == status_before     # still says completed
    assert not (run_dir / "logs" / "error.log").exists()


def _long_pretrain_past_its_first_checkpoint(run_dir: Path) -> tuple[subprocess.Popen, list[str], dict[str, str]]:
    """A long `lmim pretrain` (synthetic data) in its own process, once it has written a checkpoint:
    the process, its command line and its environment."""
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", *TINY, "data.loader=synthetic",
            "synthetic_batches=50", "epochs=100", "checkpoint.every_steps=2", f"run_dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((run_dir / "checkpoints").glob("step_*")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the test could stop it"
    return proc, args, env


def test_sigterm_mid_run_records_interrupted_and_exits_143(tmp_path):
    """`kill`, `scancel` and preempting schedulers send SIGTERM: the run must say why it stopped
    (status.json "interrupted", one sentence, exit 143) rather than stay "running" forever, and
    resume=auto must go on from its last checkpoint."""
    import json
    import signal

    run_dir = tmp_path / "r"
    proc, args, env = _long_pretrain_past_its_first_checkpoint(run_dir)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("lmim pretrain:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "resume=auto" in lines[0] and "Traceback" not in err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["exit_code"] == 143 and status["step"] >= 2
    resumed = subprocess.run([*args, "resume=auto", "max_steps=" + str(status["step"] + 1)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout


def test_sigterms_in_a_row_stop_a_run_as_one_does(tmp_path):
    """Under srun every process of the step gets the scheduler's SIGTERM and the launcher forwards its own:
    two arrive together. A later one must not break the unwinding the first began (it escaped as a
    `Terminated` traceback from wherever the first had got to, exit 1, status.json left "running")."""
    import json
    import signal
    import time

    run_dir = tmp_path / "r"
    proc, args, env = _long_pretrain_past_its_first_checkpoint(run_dir)
    # More SIGTERMs follow the first, every half millisecond for a while: two sent at once are delivered
    # as one (signals do not queue), and one of the train lands while the first is unwinding the run.
    for _ in range(200):
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.0005)
    _, err = proc.communicate(timeout=120)
    # 143 from the run, or killed by a SIGTERM that came after it had restored the default handler on its
    # way out (its sentence and status already written): a shell reports both as 143
    assert proc.returncode in (143, -signal.SIGTERM), err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("lmim pretrain:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in err, err[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"


def test_eval_splits_are_checked_before_training_not_at_the_first_evaluation(small_dataset, tmp_path):
    """data.eval_url and eval.knn_train_url are first read at a k-NN evaluation, which may come after
    hours of training and before that step's checkpoint: a missing or unlabelled split must stop the
    start, naming the key, with nothing written."""
    from lmim.tools.shard import build_dataset
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(flat / f"{i}.png")
    unlabelled = tmp_path / "unlabelled"
    build_dataset(str(flat), str(unlabelled), progress=False)
    cases = [([f"data.eval_url={tmp_path / 'nosuch'}"], 4, "data.eval_url: no manifest.json"),
             ([f"data.eval_url={unlabelled}"], 2, "has no class labels"),
             ([f"data.eval_url={small_dataset}", f"eval.knn_train_url={unlabelled}"], 2, "eval.knn_train_url"),
             ([f"eval.knn_train_url={small_dataset}"], 2, "eval.knn_train_url is set but data.eval_url is not")]
    for extra, code, needle in cases:
        run_dir = tmp_path / f"run{code}{len(extra)}"
        proc = _pretrain(f"data.url={small_dataset}", *extra, f"run_dir={run_dir}", "max_steps=2")
        assert proc.returncode == code, proc.stderr[-2000:]
        assert needle in _one_sentence(proc)
        assert not run_dir.exists()


def test_resuming_with_another_model_shape_is_a_config_error_naming_the_key(tmp_path):
    """The checkpoints are fine; the command line changed model.depth. Reporting them as damaged
    (exit 3, 'move the damaged one away') would invite deleting good checkpoints."""
    run_dir = tmp_path / "r"
    first = _pretrain("data.loader=synthetic", "synthetic_batches=2", "max_steps=2", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    config_before = (run_dir / "config.yaml").read_text()
    depth = [a for a in TINY if a.startswith("model.depth=")][0].split("=")[1]
    again = _pretrain("data.loader=synthetic", "synthetic_batches=2", "max_steps=3", "resume=auto",
                      f"model.depth={int(depth) + 1}", f"run_dir={run_dir}")
    assert again.returncode == 2, again.stderr[-2000:]
    sentence = _one_sentence(again)
    assert f"model.depth is {int(depth) + 1} but step_00000002 was trained with {depth}" in sentence
    assert (run_dir / "config.yaml").read_text() == config_before
    # the finished run the mistaken command pointed at still reads as finished, with no error logged
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert not (run_dir / "logs" / "error.log").exists()


def test_a_synthetic_data_checkpoint_resumed_on_real_data_is_a_config_error_not_a_damaged_one(small_dataset, tmp_path):
    """The synthetic loader's position is not a position in a dataset: resuming its checkpoint on
    real data is a setting to change (exit 2, nothing written), not a damaged checkpoint (exit 3)."""
    run_dir = tmp_path / "r"
    first = _pretrain("data.loader=synthetic", "synthetic_batches=2", "max_steps=2", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    again = _pretrain(f"data.url={small_dataset}", "resume=auto", f"run_dir={run_dir}")
    assert again.returncode == 2, again.stderr[-2000:]
    assert "data.loader is 'dali' but step_00000002 was trained with 'synthetic'" in _one_sentence(again)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def test_pretrain_whose_output_reader_goes_away_is_not_a_storage_failure():
    """`lmim pretrain ... | head`: the closed pipe is a BrokenPipeError, a ConnectionError, which read
    as 'the data store cannot be reached' (exit 5). It is 141, as a shell reports a SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", "--print-config"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr[-2000:]
    assert "data store" not in proc.stderr and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


@pytest.mark.parametrize("code, kind", [(errno.EDQUOT, "disk"), (errno.ENOSPC, "disk"), (errno.EACCES, "config")])
def test_a_run_dir_out_of_quota_at_start_up_is_a_full_disk_not_a_bad_setting(tmp_path, monkeypatch, code, kind):
    """Over quota when the run folder is first written: free space (exit 6), not "choose a writable
    folder" (exit 2), which is what a permission problem there is. The quota cannot be exceeded for
    real here (root, no quota on the test disk), so the config write raises it."""
    import lmim.train.pretrain as pretrain
    from lmim.train.config import ConfigError, load_config
    from lmim.train.failures import classify

    def refused(cfg, path):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(pretrain, "save_config", refused)
    cfg = load_config("quickstart", [f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(OSError if kind == "disk" else ConfigError) as caught:
        pretrain._prepare_run_dir(cfg, tmp_path / "r")
    assert classify(caught.value).kind == kind
    assert not (tmp_path / "r").exists()          # the new run folder it made is not left behind, empty


def test_a_config_write_that_fails_leaves_no_temporary_file_and_names_the_config(tmp_path, monkeypatch):
    """On a full disk the config's temporary file stayed, 0 bytes, in the run folder; and the error a
    user read named the temporary file, not config.yaml."""
    from pathlib import Path

    from lmim.train.config import load_config, save_config

    def full(self, text, *args, **kwargs):
        open(self, "w").close()           # created, then the write fails, as on a full disk
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as caught:
        save_config(load_config("quickstart"), tmp_path / "config.yaml")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "config.yaml")
    assert list(tmp_path.iterdir()) == []


def test_a_traceback_that_cannot_be_written_leaves_no_empty_error_log(tmp_path, monkeypatch):
    import builtins

    import lmim.train.pretrain as pretrain
    from lmim.train.config import load_config

    (tmp_path / "r").mkdir()
    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "a" in mode:
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return f

    monkeypatch.setattr(builtins, "open", full)
    assert pretrain._log_traceback(load_config("quickstart", [f"run_dir={tmp_path / 'r'}"]), ValueError("x")) is None
    monkeypatch.undo()
    assert list((tmp_path / "r").iterdir()) == []      # neither logs/ nor a 0-byte error.log


def test_a_command_stopped_by_sigterm_or_ctrl_c_cleans_up_and_says_one_sentence(tmp_path):
    """`kill` used to end a bench (or any command but pretrain) at once: no sentence, and its temporary
    corpus left in /tmp. The dispatcher now unwinds SIGTERM as Ctrl-C, so `finally` blocks run; and
    Ctrl-C while torch was still importing printed two tracebacks (the safety net imported torch again)."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lmim = [sys.executable, "-c", "import sys; from lmim.tools.cli import main; sys.exit(main())"]
    proc = subprocess.Popen([*lmim, "bench", "shard", "--n", "3000", "--reps", "1", "--tmp", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    while not any(tmp_path.iterdir()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)   # inside the build of the corpus
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == ("lmim bench: stopped by SIGTERM (kill, scancel or preemption); "
                                            "run the same command again.")
    assert list(tmp_path.iterdir()) == [] and "Traceback" not in err
    # (a test run from a background job inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: the child gets the default back, as in a terminal)
    proc = subprocess.Popen([*lmim, "bench", "model", "--config", "tiny"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    # Ctrl-C during the first imports. Some libraries swallow a KeyboardInterrupt raised inside their
    # own imports (one inside numpy's, under torch's, was lost and the bench ran on), so press again
    # until it stops, as a user would.
    time.sleep(0.3)
    for _ in range(40):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            continue
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "lmim bench: interrupted; run the same command again."


def test_no_store_credentials_is_one_sentence_at_once_not_ten_minutes_of_retries(tmp_path, monkeypatch, capsys):
    """Without credentials botocore raises NoCredentialsError before any request: the reads retried it
    for the whole retry budget (10 min) as a network error, and `lmim verify` / `lmim bench pipeline`
    printed its traceback. It is a storage failure (exit 5) that names what to set, at once."""
    import time

    from lmim.pipeline.format.manifest import read_manifest
    from lmim.pipeline.storage import RetryPolicy
    from lmim.tools.cli import main

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")   # no instance-metadata lookup either
    url = "s3://no-such-bucket-lmim/ds"
    t0 = time.monotonic()
    with pytest.raises(Exception) as caught:
        read_manifest(url, {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}, retry=RetryPolicy(budget_s=600))
    assert time.monotonic() - t0 < 30
    from lmim.train.failures import classify

    failure = classify(caught.value)
    assert failure.code == 5 and "found no usable credentials" in failure.sentence and "AWS_PROFILE" in failure.sentence
    assert main(["verify", url, "--storage-option", "client_kwargs.endpoint_url=http://127.0.0.1:9"]) == 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmim verify: the data store client found no usable credentials") and "\n" not in err
    assert "or --storage-option" in err
    # `lmim bench pipeline` takes no storage options: its sentence names only the environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert main(["bench", "pipeline", url]) == 5
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "found no usable credentials" in err and "AWS_PROFILE, then" in err and "storage-option" not in err


def test_lmim_shard_stopped_by_sigterm_says_so_with_143(tmp_path, monkeypatch, capsys):
    """`lmim shard` catches KeyboardInterrupt itself (to say the build resumes), and SIGTERM arrives as
    Terminated, a KeyboardInterrupt: it said "interrupted" with 130, so a scheduler could not tell a
    preemption from Ctrl-C. (The build is replaced by one that is stopped at once: a real SIGTERM to a
    build is timing-dependent; the dispatcher's own SIGTERM path is tested on a real process above.)"""
    import lmim.tools.shard.cli as shard_cli
    from lmim.train.signals import Terminated

    def stopped(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(shard_cli, "run_build", stopped)
    (tmp_path / "src").mkdir()
    assert shard_cli.main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 143
    assert capsys.readouterr().err.strip() == ("lmim shard: stopped by SIGTERM (kill, scancel or preemption); run the "
                                               "same command again to finish the build.")
    monkeypatch.setattr(shard_cli, "run_build", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert shard_cli.main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 130
    assert "interrupted; run the same command again to finish the build." in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_sighup_from_a_closed_terminal_is_recorded_and_nohup_still_protects_the_run(small_dataset, tmp_path):
    """SIGHUP (the terminal or ssh session closed) killed a run on the spot: no sentence, status.json left
    at "running", a half-written checkpoint folder. It now unwinds as SIGTERM does, with 129; a run under
    `nohup` (SIGHUP ignored) keeps its choice and trains on."""
    import json
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def start(run_dir, ignore_hup: bool) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", *TINY, "data.loader=dali",
             "data.num_threads=1", f"data.url={small_dataset}", f"run_dir={run_dir}", "progress=false",
             *(["max_steps=100000", "epochs=100000"] if not ignore_hup else ["max_steps=6"])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignore_hup else None)

    def wait_running(proc, status):
        deadline = time.monotonic() + 200
        while not (status.is_file() and json.loads(status.read_text())["status"] == "running"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)

    run_dir = tmp_path / "hup"
    proc = start(run_dir, ignore_hup=False)
    wait_running(proc, run_dir / "status.json")
    time.sleep(1)
    proc.send_signal(signal.SIGHUP)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 129, err[-3000:]
    assert _one_sentence(subprocess.CompletedProcess([], 129, "", err)).startswith("lmim pretrain: stopped by SIGHUP")
    recorded = json.loads((run_dir / "status.json").read_text())
    assert recorded["status"] == "interrupted" and recorded["exit_code"] == 129
    assert not [p for p in (run_dir / "checkpoints").glob(".tmp-*")] if (run_dir / "checkpoints").exists() else True

    nohup_dir = tmp_path / "nohup"
    proc = start(nohup_dir, ignore_hup=True)
    wait_running(proc, nohup_dir / "status.json")
    proc.send_signal(signal.SIGHUP)
    err = proc.communicate(timeout=200)[1]
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((nohup_dir / "status.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("signame, raised", [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")])
def test_a_signal_whose_exception_a_finalizer_swallowed_still_stops_at_the_next_safe_point(monkeypatch, signame,
                                                                                          raised):
    """Python runs a signal handler between any two bytecodes, also inside a finalizer, which prints the
    exception as "Exception ignored" and drops it: about one SIGHUP in eight, caught inside DALI's
    Pipeline.__del__, left a tiny run training on. `raise_pending` raises it again between steps."""
    import gc
    import signal

    import lmim.train.signals as signals
    from lmim.train.signals import raise_pending, sigterm_interrupts

    if signame == "SIGINT" and signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is ignored in this process (started as a background job)")
    signum = getattr(signal, signame)
    Terminated = getattr(signals, raised, KeyboardInterrupt)

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signum)   # arrives while the finalizer runs
            for _ in range(1000):                   # bytecodes for the handler to run between
                pass

    shown = []   # what Python would print as "Exception ignored in ... Traceback"
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: shown.append(unraisable.exc_type))
    with sigterm_interrupts():
        Finalized()
        gc.collect()                                   # the raise inside __del__ is lost here...
        assert shown == []                             # ...and not printed as a traceback for the user
        if signame == "SIGTERM":   # nothing is unwinding after all: a second kill still stops the command
            with pytest.raises(Terminated):
                os.kill(os.getpid(), signum)
                for _ in range(1000):
                    pass
        with pytest.raises(Terminated):
            raise_pending()
    raise_pending()                                   # a later command in the same process starts afresh


def test_a_file_where_the_checkpoints_folder_goes_is_a_bad_setting_at_start_up(small_dataset, tmp_path):
    """`run_dir/checkpoints` as a file was found only at the first checkpoint (exit 6, after training)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("x")
    proc = _pretrain(f"data.url={small_dataset}", f"run_dir={run_dir}", "max_steps=2", "checkpoint.every_steps=1")
    assert proc.returncode == 2
    assert "holds a file named 'checkpoints'" in _one_sentence(proc)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoints"]   # nothing but the lock
    proc = _pretrain(f"data.url={small_dataset}", f"run_dir={run_dir / 'checkpoints'}", "max_steps=2")
    assert proc.returncode == 2   # run_dir itself a file: said so (was "cannot be written (File exists)")
    assert "checkpoints' is a file, not a folder: choose another run_dir" in _one_sentence(proc)
    assert (run_dir / "checkpoints").read_text() == "x"


def test_a_bug_in_any_command_exits_70_with_its_traceback_not_1(monkeypatch, capsys):
    """The safety net re-raised an unexpected error: Python's traceback and exit 1, which is what
    `lmim verify` returns for "found a problem", so a script could not tell a crash from a finding."""
    import lmim.tools.shard.verify as verify
    from lmim.tools.cli import main

    def broken(argv):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(verify, "main", broken)
    assert main(["verify", "anywhere"]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1] == ("lmim verify: unexpected ZeroDivisionError: division by zero (a bug; "
                                            "please report it with the traceback above)")


def test_a_second_run_into_a_run_folder_in_use_is_refused_and_writes_nothing(small_dataset, tmp_path):
    """Two live runs in one run_dir (a requeue while the old job is dying) interleaved their checkpoints
    and metrics. The run holds a lock on its folder; a second start is refused (exit 2) and leaves the
    folder as the live run has it. The lock goes with the process, however it ends."""
    import json

    from lmim.train.run_lock import RunFolderLock

    run_dir = tmp_path / "run"
    proc = _pretrain(f"data.url={small_dataset}", f"run_dir={run_dir}", "max_steps=1", "checkpoint.every_steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with RunFolderLock() as live:          # the folder's live run, as another process holds it
        live.acquire(run_dir)
        proc = _pretrain(f"data.url={small_dataset}", f"run_dir={run_dir}", "max_steps=2", "resume=auto")
        assert proc.returncode == 2
        assert "is in use by another lmim pretrain running now" in _one_sentence(proc)
        assert {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    proc = _pretrain(f"data.url={small_dataset}", f"run_dir={run_dir}", "max_steps=2", "resume=auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "status.json").read_text())["step"] == 2


@pytest.mark.timeout(120)
def test_a_terminal_that_really_closes_ends_a_command_with_129_not_an_io_error(tmp_path):
    """Closing the terminal hangs it up: SIGHUP, then every write to it fails with EIO, and the closing
    sentence itself turned the interruption into an OSError (exit 1). A pseudo-terminal is closed under
    a command that prints (as a progress bar does) to show it: the command still ends with 129."""
    import json
    import pty
    import time

    result = tmp_path / "rc.json"
    child = f"""
import json, sys, time, types
from lmim.tools import cli
mod = types.ModuleType("printing_command")
def main(argv):
    while True:
        print("progress", flush=True)
        time.sleep(0.05)
mod.main = main
sys.modules["printing_command"] = mod
cli.COMMANDS["printing"] = ("printing_command", "prints until stopped")
rc = cli.main(["printing"])
open({str(result)!r}, "w").write(json.dumps(rc))
"""
    pid, fd = pty.fork()
    if pid == 0:   # the child: a command whose stdout and stderr are the terminal
        os.execve(sys.executable, [sys.executable, "-c", child], {**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    seen = b""
    while b"progress" not in seen and time.monotonic() < deadline:
        seen += os.read(fd, 1000)
    os.close(fd)   # the terminal closes: the kernel hangs it up and sends SIGHUP to the command
    os.waitpid(pid, 0)
    assert json.loads(result.read_text()) == 129


def test_a_start_that_finds_the_new_run_folder_taken_touches_nothing_in_it(tmp_path):
    """Two starts that both found no run folder: the one that locks it second used to clean the first's
    checkpoint in progress and overwrite its config.yaml before its lock was refused. The lock now
    comes right after the folder exists, before anything in it is cleaned or written."""
    import lmim.train.pretrain as pretrain
    from lmim.train.config import load_config

    run_dir = tmp_path / "r"
    (run_dir / "checkpoints" / ".tmp-step_00000008").mkdir(parents=True)   # the first run's write in progress
    (run_dir / "config.yaml").write_text("theirs\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from lmim.train.run_lock import "
         "RunFolderLock; lock = RunFolderLock(); lock.acquire(Path(sys.argv[1])); print('locked', flush=True); "
         "time.sleep(60)", str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = load_config("quickstart", [f"run_dir={run_dir}"])
        with pytest.raises(pretrain.RunFolderInUse, match="is in use by another lmim pretrain"):
            pretrain._prepare_run_dir(cfg, run_dir, pretrain.RunFolderLock())
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / "config.yaml").read_text() == "theirs\n"
    assert (run_dir / "checkpoints" / ".tmp-step_00000008").is_dir()


def test_a_failure_held_outside_a_command_does_not_deafen_the_next_one():
    """The trainer holds SIGTERM while a failure unwinds it; a test (or a notebook) that calls run()
    itself does so outside any `sigterm_interrupts` block, and the next command in the same process
    must still stop on a SIGTERM."""
    import signal

    from lmim.train.signals import Terminated, hold_interruptions, sigterm_interrupts

    hold_interruptions()
    with sigterm_interrupts():
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):   # bytecodes for the handler to run between
                pass


def test_an_import_that_fails_after_a_swallowed_ctrl_c_is_the_interruption_not_a_bug(monkeypatch, capsys):
    """Ctrl-C landing inside numpy's C-module import was swallowed by the import machinery of a library
    above it; the next import of numpy then failed ("cannot load module more than once per process"),
    and the dispatcher printed that ImportError's traceback as a bug (seen once in the suite)."""
    import signal
    import types

    import lmim.tools.cli as cli

    def command(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C arrives, and is swallowed...
            for _ in range(1000):
                pass
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("the SIGINT did not arrive")
        raise ImportError("cannot load module more than once per process")   # ...and the next import fails

    monkeypatch.setitem(sys.modules, "lmim_test_interrupted_import", types.SimpleNamespace(main=command))
    monkeypatch.setitem(cli.COMMANDS, "verify", ("lmim_test_interrupted_import", "test"))
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is ignored in this process (started as a background job)")
    assert cli.main(["verify"]) == 130
    assert capsys.readouterr().err.strip() == "lmim verify: interrupted; run the same command again."
