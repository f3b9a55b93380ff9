"""`lmim bench quality`: argument errors, the step-time calibration, and a tiny end-to-end run."""
from __future__ import annotations

import json

import pytest
import torch

from lmim.tools import datasets
from lmim.tools.bench import quality
from lmim.train.config import load_config

needs_fmnist = pytest.mark.skipif(not datasets.fashion_mnist_available(),
                                  reason="Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")


def test_bad_arguments_say_one_sentence(capsys):
    assert quality.main(["--methods", "random,bogus"]) == 2
    assert "unknown method(s) bogus" in capsys.readouterr().err
    assert quality.main(["--methods", ","]) == 2                       # was an empty table, exit 0
    assert "--methods names no method" in capsys.readouterr().err
    if not torch.cuda.is_available():   # --large on a CPU started a 3M-image run without a word
        assert quality.main(["--large"]) == 2
        assert "--large is the GPU setting" in capsys.readouterr().err
    # counts are argparse usage errors (exit 2, naming the option), inf and nan included: an infinite
    # budget ended in an OverflowError traceback after calibration, nan printed "nan min"
    for argv in (["--budget-minutes", "0"], ["--budget-minutes", "inf"], ["--budget-minutes", "nan"],
                 ["--images", "-5"], ["--train-per-class", "0"]):
        with pytest.raises(SystemExit) as stop:
            quality.main(argv)
        assert stop.value.code == 2 and f"argument {argv[0]}: must be a positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--dataset", "imagenet"])
    with pytest.raises(SystemExit):
        quality.main(["--equal", "flops"])


def test_bad_override_fails_before_any_work(tmp_path, capsys):
    assert quality.main(["--work-dir", str(tmp_path / "w"), "--set", "model.depthh=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.depthh" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w" / "data").exists()


def test_missing_fashion_mnist_is_one_clear_sentence(monkeypatch, tmp_path, capsys):
    # Stands in for a machine without the Debian package (cannot uninstall it from a test).
    monkeypatch.setattr(datasets, "fashion_mnist_available", lambda *a, **k: False)
    assert quality.main(["--work-dir", str(tmp_path / "w"), "--methods", "pixels"]) == 2
    err = capsys.readouterr().err.strip()
    assert "apt-get install -y dataset-fashion-mnist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w" / "data").exists()


def test_calibration_measures_each_objective():
    cfg = load_config("quickstart", ["model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                                     "model.projector_hidden_dim=32", "model.decoder_dim=32", "model.decoder_depth=1",
                                     "model.decoder_num_heads=2", "data.batch_size=4"])
    times = quality.calibrate({"lmim": "infonce", "mae": "mae", "naive": "naive_mse"}, cfg, rounds=1, steps=1)
    assert set(times) == {"lmim", "mae", "naive"}
    assert all(0 < t < 60 for t in times.values())


@pytest.mark.slow
@needs_fmnist
def test_end_to_end_tiny(tmp_path, capsys):
    """Data prep -> random init, Latent MIM (a few steps through `lmim pretrain`) and pixels -> JSON."""
    argv = ["--work-dir", str(tmp_path), "--methods", "random,lmim,pixels", "--equal", "time", "--budget-minutes", "0.05",
            "--train-per-class", "13", "--test-per-class", "5", "--set", "data.num_visible=8", "--json"]
    assert quality.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert set(res) >= {"random", "lmim", "pixels", "meta"}
    for m in ("random", "lmim", "pixels"):
        for k in ("knn_loo1", "knn20", "linear"):
            assert 0 <= res[m][k] <= 100, (m, k)
    assert 0 < res["random"]["collapse_cos"] <= 1 and 0 < res["lmim"]["collapse_cos"] <= 1
    assert "collapse_cos" not in res["pixels"]
    assert res["lmim"]["steps"] >= 1 and res["random"]["steps"] == 0
    assert res["lmim"]["images_seen"] == res["lmim"]["steps"] * res["meta"]["batch"]
    assert res["meta"]["equal"] == "time" and res["meta"]["dataset"] == "fashion_mnist"
    assert res["meta"]["n_train"] == 130 and res["meta"]["n_test"] == 50
    assert res["meta"]["overrides"] == ["data.num_visible=8"]
    cfg = (tmp_path / "runs" / "lmim" / "config.yaml").read_text()
    assert "num_visible: 8" in cfg
    assert any("kNN-LOO1" in line for line in out)  # the table names its protocols
    # The data is reused by a second run (no re-export).
    assert quality.main(["--work-dir", str(tmp_path), "--methods", "pixels", "--train-per-class", "13",
                         "--test-per-class", "5"]) == 0
    assert "reusing" in capsys.readouterr().err


@pytest.mark.slow
def test_shapes_equal_images_every_row(tmp_path, capsys):
    """The shapes data set (generated, needs no package) at equal images: every trained method,
    the supervised ceiling included, sees exactly the same number of images."""
    argv = ["--work-dir", str(tmp_path), "--dataset", "shapes", "--equal", "images", "--images", "40",
            "--train-per-class", "4", "--test-per-class", "3", "--json",
            "--set", "data.batch_size=8", "--set", "model.depth=1", "--set", "model.projector_hidden_dim=64"]
    assert quality.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert set(res) >= set(quality.METHODS) | {"ratio", "meta"}
    seen = {m: res[m]["images_seen"] for m in quality.TRAINED}
    assert set(seen.values()) == {40}, seen                 # 5 steps of 8 for every trained method
    assert res["random"]["images_seen"] == 0 and res["pixels"]["images_seen"] == 0
    assert res["meta"]["n_train"] == 40 and res["meta"]["n_test"] == 30 and res["meta"]["dataset"] == "shapes"
    for m in quality.METHODS:
        assert 0 <= res[m]["knn20"] <= 100 and 0 <= res[m]["linear"] <= 100, m
    assert any(line.startswith("supervised") for line in out)
