"""Training from S3 through real network faults (a loopback proxy in front of moto's server).

- Through 503 SlowDown, connection resets, cut bodies and stalls on a seeded schedule, the run
  equals the fault-free run: same losses, same final weights.
- An outage longer than the retry budget stops the run with one sentence and exit code 5, and
  `resume=auto` once the store is back finishes with the fault-free run's losses and weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from tests.faultproxy import FaultProxy
from tests.test_pipeline import make_dataset, upload
from tests.test_train import TINY, _losses
from lmim.train.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Streaming reader (the remote path), 5 shards of 8 images, batch 8: 5 steps per epoch, 2 epochs.
STREAM = [*TINY, "data.loader=dali", "data.reader=stream", "data.num_threads=1", "data.prefetch_shards=1",
          "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def remote(tmp_path_factory, s3_server):
    import boto3

    local = make_dataset(str(tmp_path_factory.mktemp("faults") / "ds"), n=40, per_shard=8)
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).create_bucket(Bucket="faults")
    return upload(local, "faults", "ds", s3_server)


def _opts(endpoint: str) -> list[str]:
    return [f"data.storage_options.client_kwargs.endpoint_url={endpoint}"]


def _train(run_dir: Path, url: str, endpoint: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", *STREAM,
                           f"data.url={url}", *_opts(endpoint), f"run_dir={run_dir}", *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same losses at every step and bit-identical final weights (online and EMA target)."""
    assert _losses(run_dir) == _losses(reference)
    a, b = _weights(run_dir), _weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _resume_when_the_store_is_back(proxy: FaultProxy, run_dir: Path, url: str) -> None:
    proxy.down_after, proxy.down = None, False
    proc = _train(run_dir, url, proxy.endpoint_url, "resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]


def _upstream(s3_server) -> tuple[str, int]:
    u = urlparse(s3_server.endpoint_url)
    return u.hostname, u.port


@pytest.fixture(scope="module")
def clean_run(remote, s3_server, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clean") / "r"
    proc = _train(run_dir, remote, s3_server.endpoint_url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.timeout(600)
def test_training_through_network_faults_equals_the_fault_free_run(remote, s3_server, clean_run, tmp_path):
    proxy = FaultProxy(_upstream(s3_server), fault_rate=0.4, seed=3, stall_s=0.2)
    try:
        proc = _train(tmp_path / "r", remote, proxy.endpoint_url, "data.retry_budget_s=120")
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    faults = {k: v for k, v in proxy.counts.items() if k not in ("ok", "refused")}
    assert sum(faults.values()) >= 3 and sum(1 for v in faults.values() if v) >= 2, proxy.counts
    _assert_same_run(tmp_path / "r", clean_run)


@pytest.mark.timeout(600)
def test_an_outage_past_the_budget_stops_cleanly_and_resumes_exactly(remote, s3_server, clean_run, tmp_path):
    run_dir = tmp_path / "r"
    proxy = FaultProxy(_upstream(s3_server), seed=0)
    try:
        # The store goes down for good after the first checkpoint: a 2 s budget runs out.
        proc = _train(run_dir, remote, proxy.endpoint_url, "max_steps=2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        proxy.down = True
        proc = _train(run_dir, remote, proxy.endpoint_url, "resume=auto", "data.retry_budget_s=2")
        assert proc.returncode == 5, proc.stderr[-3000:]
        last = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmim pretrain:")]
        assert len(last) == 1 and "the data store cannot be reached" in last[0] and "retry budget 2 s" in last[0]
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "failed" and status["kind"] == "storage" and status["exit_code"] == 5
        assert status["last_checkpoint"].endswith("step_00000002")
        # The store is back: the run continues from its last checkpoint to the fault-free result.
        _resume_when_the_store_is_back(proxy, run_dir, remote)
    finally:
        proxy.close()
    _assert_same_run(run_dir, clean_run)


@pytest.mark.timeout(600)
def test_an_outage_in_the_middle_of_an_epoch_stops_cleanly_and_resumes_exactly(remote, s3_server, clean_run, tmp_path):
    run_dir = tmp_path / "r"
    # manifest (HEAD + GET) and three shards (HEAD + GET each), then nothing: the store dies mid-epoch.
    proxy = FaultProxy(_upstream(s3_server), seed=0, down_after=8)
    try:
        proc = _train(run_dir, remote, proxy.endpoint_url, "data.retry_budget_s=2")
        assert proc.returncode == 5, proc.stderr[-3000:]
        assert "network error after" in proc.stderr and "shard-" in proc.stderr
        status = json.loads((run_dir / "status.json").read_text())
        assert status["kind"] == "storage" and 2 <= status["step"] < 10 and status["last_checkpoint"]
        _resume_when_the_store_is_back(proxy, run_dir, remote)
    finally:
        proxy.close()
    _assert_same_run(run_dir, clean_run)
