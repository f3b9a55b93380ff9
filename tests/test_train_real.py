"""The trainer on real shards through the DALI pipeline, in real processes: a kill at an arbitrary
moment then `resume=auto`, two ranks under torchrun/gloo, and the quickstart command itself."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_pipeline import make_dataset
from tests.test_train import TINY, _losses, _run
from lmim.train.checkpoint import latest_checkpoint, list_checkpoints
from lmim.train.observe import read_metrics

REPO = Path(__file__).resolve().parents[1]
# 4 x 4 grid of 4 px patches, no gap: 16 px crops of the 64 x 48 test photos.
REAL = [*TINY, "data.loader=dali", "data.num_threads=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("train") / "ds"), n=40, per_shard=10)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", *args]


def _env() -> dict[str, str]:
    # Same thread count in every process, so CPU kernels reduce in the same order (exact losses).
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def test_real_shards_end_to_end_with_knn(shards, tmp_path):
    out = _run(tmp_path / "r", *REAL[len(TINY):], f"data.url={shards}", "data.loader=dali", f"data.eval_url={shards}",
               "eval.knn_every_epochs=1", "plots=true")
    assert out["step"] == 10 and out["steps_per_epoch"] == 5            # 40 images / batch 8
    recs = read_metrics(tmp_path / "r" / "metrics.jsonl")
    knn = [r["knn_top1"] for r in recs if "knn_top1" in r]
    assert len(knn) == 2 and all(0 <= v <= 100 for v in knn)          # after epochs 1 and 2
    assert out["knn_top1"] == knn[-1]
    assert all(0 <= r["data_wait_share"] <= 1 for r in recs if "data_wait_share" in r)
    last = [r for r in recs if "loss" in r][-1]
    assert last["data_skipped_shards"] == 0 and last["data_skipped_samples"] == 0  # logged with the loss
    assert (tmp_path / "r" / "plots" / "masks.png").stat().st_size > 0


def test_a_truncated_shard_is_skipped_and_the_log_counts_it(shards, tmp_path):
    import shutil

    from lmim.pipeline.format.manifest import read_manifest

    ds = tmp_path / "ds"
    shutil.copytree(shards, ds)
    bad = ds / read_manifest(str(ds)).shards[2].name
    bad.write_bytes(bad.read_bytes()[:1000])
    out = _run(tmp_path / "r", *REAL[len(TINY):], f"data.url={ds}", "data.loader=dali")
    assert out["step"] == 10  # every epoch keeps its length: the other shards wrap
    recs = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert recs[-1]["data_skipped_shards"] == 1


@pytest.mark.timeout(300)
def test_sigkill_mid_run_then_resume_auto_is_exact(shards, tmp_path):
    """Killed (SIGKILL) at whatever moment the test gets to it, then resumed: same losses and
    weights as a run that was never interrupted."""
    common = [*REAL, f"data.url={shards}", "epochs=4", "checkpoint.every_steps=1", "checkpoint.keep=2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cli(*common, f"run_dir={ref}"), cwd=REPO, env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(_cli(*common, f"run_dir={cut}"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = list_checkpoints(cut)
        if done and done[-1][0] >= 7:  # mid-epoch 2 of 4, while it is writing the next checkpoint or stepping
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the test could kill it"
    killed_at = list_checkpoints(cut)[-1][0]
    assert 7 <= killed_at < 20

    resumed = subprocess.run(_cli(*common, f"run_dir={cut}", "resume=auto"), cwd=REPO, env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _losses(ref), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    wa = load_file(str(latest_checkpoint(ref) / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(cut) / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.timeout(300)
def test_two_processes_torchrun_gloo(shards, tmp_path):
    """Two ranks (torchrun, gloo on the CPU): identical weights after every optimizer step, disjoint
    data within every epoch, the same number of steps."""
    run_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmim.train.pretrain", "--config", "quickstart", *REAL, f"data.url={shards}", "data.batch_size=4",
           "debug_rank_log=true", f"run_dir={run_dir}"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # the budget divides the node's cores by its 2 ranks; torchrun's OMP_NUM_THREADS=1 is not a cap
    threads = next(ln for ln in done.stdout.splitlines() if ln.startswith("threads: "))
    assert "shared by 2 processes on the node" in threads and "OMP_NUM_THREADS=1 ignored" in threads, threads
    logs = [[json.loads(line) for line in (run_dir / "debug" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]
    digests = [{rec["step"]: rec["digest"] for rec in log if "digest" in rec} for log in logs]
    # 40 images over 2 ranks at batch 4: 5 steps per epoch, 2 epochs.
    assert sorted(digests[0]) == sorted(digests[1]) == list(range(1, 11))
    assert all(digests[0][s] == digests[1][s] for s in digests[0])
    assert len(set(digests[0].values())) == 10                          # and the weights did change
    keys = [[rec for rec in log if "keys" in rec] for log in logs]
    for epoch in range(2):
        seen = [{k for rec in ks if rec["step"] // 5 == epoch for k in rec["keys"]} for ks in keys]
        assert len(seen[0]) == len(seen[1]) == 20 and seen[0].isdisjoint(seen[1])
    assert latest_checkpoint(run_dir).name == "step_00000010"


# pretrain, with every checkpoint file read on process 1 failing (EIO): a node whose disk fails.
_EIO_ON_PROCESS_1 = """
import errno, os, sys
from lmim.train import checkpoint
real = checkpoint.checksum_of_file
def flaky(path, *args, **kwargs):
    if os.environ["RANK"] == "1" and os.environ["LMIM_TEST_UNREADABLE"] in str(path):
        raise OSError(errno.EIO, "Input/output error")
    return real(path, *args, **kwargs)
checkpoint.checksum_of_file = flaky
from lmim.train.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_a_checkpoint_one_process_cannot_read_is_passed_over_by_every_process(tmp_path):
    """resume=auto on 2 ranks where process 1 cannot read the newest checkpoint: both resume from the
    previous one (chosen each on its own, rank 0 resumed at step 4 and rank 1 at step 2), the warning
    names the process, and the unreadable checkpoint is left in place (a read error is no damage)."""
    run_dir = tmp_path / "r"
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--config", "quickstart", *TINY, "data.loader=synthetic", "synthetic_batches=4", "data.batch_size=4",
            "debug_rank_log=true", f"run_dir={run_dir}", "checkpoint.every_steps=2", "checkpoint.keep=3"]
    done = subprocess.run([*head, "-m", "lmim.train.pretrain", *args, "max_steps=4"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    newest = latest_checkpoint(run_dir)
    assert newest.name == "step_00000004"
    (run_dir / "debug").rename(tmp_path / "debug-first")
    script = tmp_path / "eio_on_process_1.py"
    script.write_text(_EIO_ON_PROCESS_1)
    done = subprocess.run([*head, str(script), *args, "resume=auto", "max_steps=6"], cwd=REPO,
                          env={**_env(), "LMIM_TEST_UNREADABLE": newest.name},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping step_00000004: process 1: checkpoint" in done.stderr, done.stderr[-3000:]
    assert "cannot be read (Input/output error)" in done.stderr
    assert "resumed from" in done.stdout and "step_00000002 at step 2" in done.stdout
    logs = [[json.loads(line) for line in (run_dir / "debug" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]
    digests = [{rec["step"]: rec["digest"] for rec in log if "digest" in rec} for log in logs]
    assert sorted(digests[0]) == sorted(digests[1]) == [3, 4, 5, 6]     # both went on from step 2
    assert digests[0] == digests[1]                                      # with the same weights
    assert newest.is_dir() and not list((run_dir / "checkpoints").glob("damaged-*"))


@pytest.mark.timeout(300)
def test_process_0_decides_whether_the_run_resumes(tmp_path):
    """resume=auto where process 1 sees no checkpoint at all (a stale view of a network file system):
    it resumes with process 0 from the newest one instead of starting afresh (before, the two waited
    in different collectives)."""
    run_dir = tmp_path / "r"
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--config", "quickstart", *TINY, "data.loader=synthetic", "synthetic_batches=4", "data.batch_size=4",
            "debug_rank_log=true", f"run_dir={run_dir}", "checkpoint.every_steps=2"]
    done = subprocess.run([*head, "-m", "lmim.train.pretrain", *args, "max_steps=4"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir / "debug").rename(tmp_path / "debug-first")
    script = tmp_path / "no_checkpoints_on_process_1.py"
    script.write_text("import os, sys\n"
                      "from lmim.train import pretrain\n"
                      "if os.environ['RANK'] == '1':\n    pretrain.latest_checkpoint = lambda run_dir: None\n"
                      "sys.exit(pretrain.main(sys.argv[1:]))\n")
    done = subprocess.run([*head, str(script), *args, "resume=auto", "max_steps=6"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step_00000004 at step 4" in done.stdout
    logs = [[json.loads(line) for line in (run_dir / "debug" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]
    digests = [{rec["step"]: rec["digest"] for rec in log if "digest" in rec} for log in logs]
    assert sorted(digests[0]) == sorted(digests[1]) == [5, 6] and digests[0] == digests[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quickstart_command_runs_end_to_end(tmp_path):
    """`lmim quickstart` (shortened): data -> shards -> pretrain -> k-NN vs random init -> export."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    cmd = [sys.executable, "-m", "lmim.tools.cli", "quickstart", "--dataset", "digits", "--data-dir", str(data),
           "--run-dir", str(run_dir), "max_steps=4", "progress=false"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "quickstart.json").read_text())
    assert summary["steps"] == 4 and summary["dataset"] == "digits"
    assert set(summary["knn_top1"]) == {"Latent MIM (trained)", "random init", "raw pixels"}
    assert summary["knn_top1"]["raw pixels"] > 80                       # digits: pixels alone do well
    assert "k-NN top-1" in done.stdout and "encoder:" in done.stdout
    import timm  # noqa: F401  (used by the printed line)

    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("load it:")).split("vit = ", 1)[1]
    vit = eval(line)  # the exact line the quickstart tells the user to run
    assert vit.patch_embed.patch_size == (4, 4) and vit.num_classes == 0
    # The whole printed line, pasted into a fresh Python (where only the line's own imports run).
    whole = next(ln for ln in done.stdout.splitlines() if ln.startswith("load it:")).split(":", 1)[1].strip()
    fresh = subprocess.run([sys.executable, "-c", f"{whole}; print(vit.num_classes)"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0 and fresh.stdout.strip() == "0", fresh.stderr[-2000:]
    # A second run reuses the shards.
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=540)
    assert again.returncode == 0 and "reusing train shards" in again.stdout


def _keys(run_dir: Path, ranks: int) -> list[list[str]]:
    """Each rank's micro-batches' keys, in order, from the debug rank log."""
    logs = [(run_dir / "debug" / f"rank{r}.jsonl").read_text().splitlines() for r in range(ranks)]
    return [[k for line in log for k in json.loads(line).get("keys", [])] for log in logs]


def _launch(processes: int, run_dir: Path, shards: str, *extra: str) -> subprocess.CompletedProcess:
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
            if processes > 1 else [sys.executable])
    cmd = [*head, "-m", "lmim.train.pretrain", "--config", "quickstart", *REAL, f"data.url={shards}",
           "data.batch_size=4", "debug_rank_log=true", f"run_dir={run_dir}", *extra]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_mid_epoch_on_another_number_of_processes(shards, tmp_path, before, after):
    """Preempted mid-epoch on `before` processes, resumed on `after`: across the two runs every sample of
    every epoch is trained on exactly once, and the resumed processes get equal batches."""
    run_dir = tmp_path / "r"
    _launch(before, run_dir, shards, "max_steps=2")            # 2 steps of batch 4 per process, then stop
    first = _keys(run_dir, before)
    assert [len(k) for k in first] == [8] * before
    (run_dir / "debug").rename(tmp_path / "debug-first")
    done = _launch(after, run_dir, shards, "resume=auto")       # to the end of epoch 2 (TINY: epochs=2)
    assert f"resumed with {before} -> {after} processes" in done.stdout
    second = _keys(run_dir, after)
    assert len({len(k) for k in second}) == 1                   # equal batches on every process
    left = (40 - 8 * before) // after                           # what each resumed process takes of epoch 1
    epoch1 = [k for ks in first for k in ks] + [k for ks in second for k in ks[:left]]
    epoch2 = [k for ks in second for k in ks[left:]]
    assert len(epoch1) == len(set(epoch1)) == 40                # nothing lost, nothing twice
    assert len(epoch2) == len(set(epoch2)) == 40                # and the next epoch on the new count
    state = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert state["world_size"] == after and state["step"] == 2 * 40 // (4 * after)


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch_is_exact(shards, tmp_path):
    """The everyday "train longer" case: a run that stopped exactly at an epoch boundary (its
    checkpoint holds the loader at the end of that epoch) goes on into the next epoch, with the
    losses of a run that was never stopped."""
    common = [*REAL[len(TINY):], f"data.url={shards}"]   # 40 images, batch 8: 5 steps per epoch, 2 epochs
    _run(tmp_path / "ref", *common)
    first = _run(tmp_path / "cut", *common, "max_steps=5")
    assert first["step"] == 5
    resumed = _run(tmp_path / "cut", *common, "resume=auto")
    assert resumed["step"] == 10
    a, b = _losses(tmp_path / "ref"), _losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


def test_resuming_with_another_batch_size_goes_on_from_the_next_epoch_and_its_logged_epoch_never_goes_back(
        shards, tmp_path):
    """A checkpoint mid-epoch, resumed with half the batch size: the data cannot resume mid-epoch (the
    loader starts the next epoch and says why; the step counter moves to that epoch, so the run still
    trains its 2 epochs), and the metrics log's `epoch` follows the data, never going backwards."""
    common = [*REAL[len(TINY):], f"data.url={shards}"]   # 40 images, batch 8: 5 steps per epoch
    first = _run(tmp_path / "r", *common, "max_steps=3", "checkpoint.every_steps=3")
    assert first["step"] == 3
    resumed = _run(tmp_path / "r", *common, "resume=auto", "data.batch_size=4")
    assert resumed["step"] == 20 and resumed["steps_per_epoch"] == 10   # steps 11-20: epoch 1 at 10 steps an epoch
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in logged if "loss" in r]
    assert epochs == pytest.approx([0.2, 0.4, 0.6] + [1 + i / 10 for i in range(1, 11)])


def test_resuming_with_another_seed_goes_on_from_the_next_epoch_and_still_trains_its_epochs(shards, tmp_path):
    """Another seed (or data set, or mixture) cannot take the saved mid-epoch position: the loader starts
    the next epoch. The step counter used to stay put, so the run trained the rest of the old epoch's
    steps on top and ended 60% into a third epoch of its 2."""
    common = [*REAL[len(TINY):], f"data.url={shards}"]   # 40 images, batch 8: 5 steps per epoch, 2 epochs
    first = _run(tmp_path / "r", *common, "max_steps=3", "checkpoint.every_steps=3")
    assert first["step"] == 3
    resumed = _run(tmp_path / "r", *common, "resume=auto", "seed=1")
    assert resumed["step"] == 10                                        # epoch 1's 5 steps, not 7 more
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in logged if "loss" in r]
    assert epochs == pytest.approx([0.2, 0.4, 0.6] + [1 + i / 5 for i in range(1, 6)])


def test_an_evaluation_that_cannot_read_its_split_loses_no_training(shards, tmp_path):
    """The k-NN split loses a shard after the start-up check: the evaluation at the end of epoch 1
    stops the run, but that step's checkpoint is already written (it comes first), so nothing
    trained is lost; with the shard back, resume=auto finishes the run with the losses of a run
    that was never stopped (the evaluation leaves the RNGs as it found them)."""
    import shutil

    from lmim.pipeline.errors import DataError
    from lmim.pipeline.format.manifest import read_manifest

    split = tmp_path / "eval"
    shutil.copytree(shards, split)
    common = [*REAL[len(TINY):], f"data.url={shards}", f"data.eval_url={split}", "eval.knn_every_epochs=1",
              "checkpoint.every_steps=5"]   # 40 images, batch 8: 5 steps an epoch, 2 epochs
    _run(tmp_path / "ref", *common)
    shard = split / read_manifest(str(split)).shards[1].name
    kept = shard.read_bytes()
    shard.unlink()
    with pytest.raises(DataError, match=shard.name):
        _run(tmp_path / "cut", *common)   # the default data.on_error=skip too: an evaluation never skips
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000005"
    status = json.loads((tmp_path / "cut" / "status.json").read_text())
    assert (status["status"], status["step"], Path(status["last_checkpoint"]).name) == ("failed", 5, "step_00000005")
    shard.write_bytes(kept)
    assert _run(tmp_path / "cut", *common, "resume=auto")["step"] == 10
    a, b = _losses(tmp_path / "ref"), _losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    # and the evaluation the failure cut short ran on resume: both k-NN figures, as the uninterrupted run's
    # (before, a resumed run skipped it for good, and a run stopped in its last one ended "completed" without it)
    knn = [{r["step"]: r["knn_top1"] for r in read_metrics(d / "metrics.jsonl") if "knn_top1" in r}
           for d in (tmp_path / "ref", tmp_path / "cut")]
    assert sorted(knn[1]) == [5, 10] and knn[1] == knn[0]


@pytest.mark.timeout(300)
def test_under_torchrun_a_config_error_is_said_once_and_a_data_error_names_its_process(shards, tmp_path):
    """Every process of a launch fails alike on a bad setting: one sentence, from process 0, not one
    per process. A data failure may be one process's own, so each says which process it is."""
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "lmim.train.pretrain", "--config", "quickstart", *REAL]
    bad = subprocess.run([*head, f"data.url={shards}", "epochs=abc", f"run_dir={tmp_path / 'a'}"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    said = [line for line in bad.stderr.splitlines() if line.startswith("lmim pretrain")]
    assert said == ["lmim pretrain (process 0 of 2): Config key 'epochs' must be an integer, got 'abc' "
                    "(from the override 'epochs=abc')."], bad.stderr[-3000:]
    missing = subprocess.run([*head, f"data.url={tmp_path / 'nothing'}", f"run_dir={tmp_path / 'b'}"], cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=300)
    said = [line for line in missing.stderr.splitlines() if line.startswith("lmim pretrain")]
    # each process that met it names itself; one may be stopped by torchrun before it gets there
    # (then it is silent, or process 0 says it was stopped)
    data = [line for line in said if str(tmp_path / "nothing") in line]
    assert data and all(line.startswith(("lmim pretrain (process 0 of 2): ", "lmim pretrain (process 1 of 2): "))
                        for line in said), missing.stderr[-3000:]


# pretrain, with the step-3 batch of one process (LMIM_TEST_FAILING_RANK) unreadable: a node whose shard fails.
_DATA_ERROR_ON_ONE_PROCESS = """
import os, sys
from lmim.pipeline.errors import DataError
from lmim.train import pretrain
real = pretrain.train_step
def failing(stepper, batches, step, *args, **kwargs):
    if os.environ["RANK"] == os.environ["LMIM_TEST_FAILING_RANK"] and step == 3:
        raise DataError("shard-000007.tar cannot be read (test)")
    return real(stepper, batches, step, *args, **kwargs)
pretrain.train_step = failing
sys.exit(pretrain.main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("failing", [1, 0])
def test_a_process_that_stops_is_not_reported_as_a_bug_by_the_others(tmp_path, failing):
    """Two processes started by hand (no launcher, so none is stopped by torchrun before it speaks);
    one meets a data error at step 3. The other's collective breaks under it: that is no bug (it was
    an "unexpected RuntimeError ... Connection reset by peer" with a traceback and exit 70). The failing
    process says its own sentence (exit 4); process 0 says another process stopped (exit 7, also in
    status.json), and a process other than 0 whose peer went leaves the saying to the one that failed."""
    script = tmp_path / "data_error_on_one_process.py"
    script.write_text(_DATA_ERROR_ON_ONE_PROCESS)
    run_dir = tmp_path / "r"
    procs = _by_hand([sys.executable, str(script), "max_steps=8"], run_dir, {"LMIM_TEST_FAILING_RANK": str(failing)})
    errs, said = _said(procs, run_dir)
    codes = [p.returncode for p in procs]
    assert codes[failing] == 4 and len(said[failing]) == 1 and said[failing][0].startswith(
        f"lmim pretrain (process {failing} of 2): the data cannot be read: shard-000007.tar cannot be read (test)"
    ), errs[failing][-3000:]   # process 0 adds where its traceback is kept
    other = 1 - failing
    assert codes[other] == 7, errs[other][-3000:]
    assert "Traceback" not in errs[other] and "unexpected" not in errs[other]
    if other == 0:
        assert len(said[0]) == 1 and said[0][0].startswith(
            "lmim pretrain (process 0 of 2): another process of this launch stopped, or the network to it failed, "
            "while this one was exchanging data with it (gloo: "), said[0]
        status = json.loads((run_dir / "status.json").read_text())
        assert (status["status"], status["kind"], status["exit_code"]) == ("failed", "peer", 7)
    else:
        assert said[1] == []


def _by_hand(script: list[str], run_dir: Path, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two pretrain processes started by hand, as a launcher would set them up (no launcher: none is
    stopped by torchrun before it speaks). Their output goes to files beside `run_dir` (a pipe nobody
    reads while the other process is waited for could fill and stall it); `_said` reads them."""
    from tests.s3server import _free_port

    port = str(_free_port())
    procs = []
    for rank in range(2):
        with open(f"{run_dir}.{rank}.out", "w") as out, open(f"{run_dir}.{rank}.err", "w") as err:
            procs.append(subprocess.Popen(
                [*script, "--config", "quickstart", *TINY, "data.loader=synthetic", "synthetic_batches=8",
                 "data.batch_size=4", f"run_dir={run_dir}"], cwd=REPO, stdout=out, stderr=err, text=True,
                env={**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                     "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", **(extra_env or {})}))
    return procs


def _said(procs: list[subprocess.Popen], run_dir: Path) -> tuple[list[str], list[list[str]]]:
    """Each process's stderr once it has ended, and the lines it said as `lmim pretrain`."""
    deadline = time.monotonic() + 240
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:   # a hung process (which a SIGTERM cannot reach from its C++ wait) must not outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
    errs = [Path(f"{run_dir}.{rank}.err").read_text() for rank in range(len(procs))]
    return errs, [[line for line in err.splitlines() if line.startswith("lmim pretrain")] for err in errs]


@pytest.mark.timeout(300)
def test_a_sigterm_to_one_process_of_a_launch_names_the_launcher_as_a_possible_sender(tmp_path):
    """torchrun stops every process with SIGTERM once one has failed, so process 0's "stopped by SIGTERM"
    must not blame only kill, scancel or preemption; process 1, whose collective then breaks, is silent."""
    run_dir = tmp_path / "r"
    procs = _by_hand([sys.executable, "-m", "lmim.train.pretrain", "epochs=1000", "checkpoint.every_steps=2"], run_dir)
    deadline = time.time() + 200
    while time.time() < deadline and procs[0].poll() is None and not list((run_dir / "checkpoints").glob("step_*")):
        time.sleep(0.05)
    assert procs[0].poll() is None, "the run ended before the test could stop it"
    procs[0].send_signal(signal.SIGTERM)
    errs, said = _said(procs, run_dir)
    assert procs[0].returncode == 143 and len(said[0]) == 1 and said[0][0].startswith(
        "lmim pretrain (process 0 of 2): stopped by SIGTERM (kill, scancel, preemption, or the launcher stopping every "
        "process once one of them has failed: if one did, its own message says why); rerun with resume=auto (it goes "
        "on from the last complete checkpoint, if one was written)."), errs[0][-3000:]
    assert procs[1].returncode == 7 and said[1] == [], errs[1][-3000:]


def test_a_config_error_only_one_process_meets_is_still_said(tmp_path):
    """RANK without a launcher (or a setting only one node refuses): a process other than 0 that waited
    for process 0's sentence in vain says its own."""
    env = {**_env(), "RANK": "1", "WORLD_SIZE": "2"}
    done = subprocess.run(_cli("epochs=abc", f"run_dir={tmp_path / 'a'}"), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    said = [line for line in done.stderr.splitlines() if line.startswith("lmim pretrain")]
    assert done.returncode == 2 and said == [
        "lmim pretrain (process 1 of 2): Config key 'epochs' must be an integer, got 'abc' (from the override "
        "'epochs=abc')."], done.stderr[-3000:]


def test_under_torchrun_a_config_error_is_said_even_when_process_0_is_the_slower_one(tmp_path):
    """torchrun stops every process once one fails: process 1 (silent on a config error) must not exit
    before process 0 has said it, or the launch fails without a word (seen on a busy machine)."""
    script = tmp_path / "slow_process_0.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '0':\n    time.sleep(3)\n"
                      "from lmim.train.pretrain import main\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--config", "quickstart", "epochs=abc", f"run_dir={tmp_path / 'a'}"]
    bad = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    said = [line for line in bad.stderr.splitlines() if line.startswith("lmim pretrain")]
    assert said == ["lmim pretrain (process 0 of 2): Config key 'epochs' must be an integer, got 'abc' "
                    "(from the override 'epochs=abc')."], bad.stderr[-3000:]
    assert bad.returncode != 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_during_the_quickstart_is_recorded_and_a_rerun_starts_over(tmp_path):
    """SIGTERM (a closed terminal, a job limit) mid-training: one sentence, exit 143, status.json
    says interrupted and how to go on, which for the quickstart is to run it again (it starts over)."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    cmd = [sys.executable, "-m", "lmim.tools.cli", "quickstart", "--dataset", "digits", "--data-dir", str(data),
           "--run-dir", str(run_dir), "progress=false"]
    proc = subprocess.Popen([*cmd, "max_steps=100000", "epochs=1000"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    status = run_dir / "status.json"
    deadline = time.monotonic() + 300
    while not (status.is_file() and json.loads(status.read_text())["status"] == "running"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(2)   # into the training loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("lmim quickstart")]
    assert len(said) == 1 and "SIGTERM" in said[0], err[-3000:]
    recorded = json.loads(status.read_text())
    assert recorded["status"] == "interrupted" and "run the same `lmim quickstart` command again" in recorded["message"]
    again = subprocess.run([*cmd, "max_steps=2"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=540)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "quickstart.json").read_text())["steps"] == 2
