"""`lmim pretrain` failures a user meets: one sentence on stderr, a documented exit code, no
traceback, and nothing written into the run folder by a start that failed."""
from __future__ import annotations

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
    return subprocess.run([sys.executable, "-m", "train.pretrain", "--config", "quickstart", *TINY,
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
