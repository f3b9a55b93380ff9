"""`lmim bench train` runs end to end on the CPU (tiny settings; no timing assertions)."""
from __future__ import annotations

import json

import pytest
import torch

from lmim.tools.cli import main


@pytest.mark.timeout(400)
def test_bench_train_cpu_json(capsys):
    rc = main(["bench", "train", "--json", "--dataset", "digits", "--photos", "130", "--steps", "2", "--repeats", "1"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert set(res["configs"]) == {"quickstart (digits)", "small photos (80 px crops)"}
    for c in res["configs"].values():
        assert c["dali_images_per_s"] > 0 and c["ideal_images_per_s"] > 0
        assert 0 <= c["dali_data_wait_share"] <= 1 and 0 <= c["ideal_data_wait_share"] < 1
        # one round: its ratio is that round's trainer with DALI over its bare step, paired
        assert c["bare_images_per_s"] > 0
        assert c["round_ratios"] == [pytest.approx(c["dali_images_per_s"] / c["bare_images_per_s"])]
        assert c["ratio"] == c["round_ratios"][0]
        assert c["loader_ratio"] == pytest.approx(c["dali_images_per_s"] / c["ideal_images_per_s"])
    assert res["ratio"] == min(c["ratio"] for c in res["configs"].values())
    assert any("data-wait" in line for line in out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_train_cuda_without_gpu_says_so(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "--device", "cuda"])
    assert exc.value.code == 2                       # a usage error, like the other benchmarks'
    assert "--device cuda needs a CUDA device" in capsys.readouterr().err


def test_a_photo_set_smaller_than_one_batch_is_refused_before_any_data_is_built(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "--photos", "20"])
    assert exc.value.code == 2 and "--photos must be at least 64" in capsys.readouterr().err
