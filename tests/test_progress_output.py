"""What a run writes when its output goes to a log file (a batch job, `nohup`, CI): plain lines a
person can read, not a progress bar redrawn into the file many times a second."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from tests.test_train import TINY
from lmim.train.report import knn_metric_name, progress_line

REPO = Path(__file__).resolve().parents[1]


def test_pretrain_into_a_log_file_prints_a_line_per_window_and_no_bar(tmp_path):
    argv = [a for a in TINY if not a.startswith(("progress=", "log_every="))]
    cmd = [sys.executable, "-m", "lmim.train.pretrain", "--config", "quickstart", *argv, "progress=true",
           "log_every=2", "data.loader=synthetic", "synthetic_batches=3", f"run_dir={tmp_path / 'r'}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)   # pipes: not a terminal
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("step ")]
    # 2 epochs x 3 batches = 6 steps, a window every 2.
    assert [ln.split(":")[0] for ln in lines] == ["step 2/6 (33%)", "step 4/6 (67%)", "step 6/6 (100%)"]
    assert all("img/s" in ln and "loss" in ln for ln in lines)
    assert "\r" not in done.stdout + done.stderr and "pretrain:" not in done.stderr


def test_progress_line_reads_as_a_sentence():
    line = progress_line(40, 460, {"loss": 1.23331, "images_per_s": 733.6, "data_wait_share": 0.052})
    assert line == "step 40/460 (9%): loss 1.2333, 734 img/s, data wait 5%"


def test_the_knn_line_names_which_knn_it_is():
    cfg = OmegaConf.create({"eval": {"knn_train_url": None, "knn_k": 20}})
    assert knn_metric_name(cfg) == "leave-one-out 1-NN within data.eval_url"
    cfg.eval.knn_train_url = "s3://bucket/train"
    assert knn_metric_name(cfg) == "weighted 20-NN on data.eval_url, eval.knn_train_url as memory"


def test_shard_build_into_a_log_file_prints_plain_lines(tmp_path):
    from PIL import Image

    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(src / f"{i}.png")
    done = subprocess.run([sys.executable, "-m", "lmim.tools.cli", "shard", str(tmp_path / "src"), str(tmp_path / "out"),
                           "--workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr
    assert "6/6 images (100%)" in done.stderr
