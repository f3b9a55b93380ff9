"""`lmim bench model` runs end to end (tiny settings) and ends with one JSON line; FLOP counts."""
from __future__ import annotations

import json
import re

import pytest

from lmim.model.config import ModelConfig
from lmim.model.flops import flops_per_image
from lmim.tools.bench import model as bench_model


def test_flops_reference_config_by_part():
    f = flops_per_image(ModelConfig(), num_visible=20)
    # Hand count for ViT-B/16: ~170 MFLOP per token per forward through 12 blocks (2 * 12 * 12 * 768^2),
    # the target encoder sees 177 tokens, the online encoder 21 tokens forward + backward (x3).
    assert 28e9 < f["target_encoder_fwd"] < 34e9
    assert 9e9 < f["online_encoder_fwd_bwd"] < 12e9
    parts = sum(v for k, v in f.items() if k != "total_step")
    assert parts <= f["total_step"] <= 1.02 * parts


def test_bench_cpu_json(capsys):
    rc = bench_model.main(["--config", "tiny", "--batch-size", "2", "--steps", "1", "--rounds", "1", "--json"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["ratio"] > 0 and res["ours_step_s"] > 0 and res["config"] == "tiny"
    assert set(res["gflop_per_image"]) >= {"online_encoder_fwd_bwd", "target_encoder_fwd", "decoder_fwd_bwd"}
    assert res["allocator"].startswith("allocator: ")


@pytest.mark.parametrize("option", ["--batch-size", "--steps", "--rounds", "--num-visible"])
def test_bench_sizes_must_be_positive(option, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse: usage line + one sentence, exit 2
        bench_model.main([option, "0"])
    assert exc.value.code == 2
    assert f"argument {option}: must be a positive whole number, got 0" in capsys.readouterr().err


def test_bench_cuda_without_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_model.main(["--device", "cuda", "--flops-only"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_gpu_small():
    assert bench_model.main(["--device", "cuda", "--config", "tiny", "--batch-size", "8", "--steps", "2",
                             "--rounds", "1"]) == 0


def test_reference_that_is_not_a_checkout_is_one_sentence(tmp_path, capsys):
    """--reference needs the user's checkout of the authors' code; lmim ships none of it."""
    rc = bench_model.main(["--config", "tiny", "--batch-size", "2", "--steps", "1", "--rounds", "1",
                           "--reference", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"lmim bench model: {tmp_path} has no models_lmim.py: pass a checkout of "
                   "github.com/yibingwei-1/LatentMIM to --reference.")
    # a checkout whose code does not import: a sentence before anything is built (was a traceback)
    (tmp_path / "models_lmim.py").write_text("import a_module_nobody_installed_lmim\n")
    rc = bench_model.main(["--config", "tiny", "--batch-size", "2", "--steps", "1", "--rounds", "1",
                           "--reference", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"lmim bench model: models_lmim.py in {tmp_path} does not import "
                                      "(ModuleNotFoundError") and "\n" not in err
    # options that would make the ratio mean something else are usage errors
    for extra, want in ((["--no-baseline"], "--reference makes the reference code the baseline"),
                        (["--objective", "mae"], "would compare two methods")):
        with pytest.raises(SystemExit) as stop:
            bench_model.main(["--config", "tiny", "--reference", str(tmp_path), *extra])
        assert stop.value.code == 2 and want in capsys.readouterr().err


def test_auto_precision_times_bf16_only_where_the_machine_does_it_natively():
    pick = bench_model.precision_candidates
    assert pick("auto", "bf16", on_gpu=False, side_by_side=False) == ["fp32", "bf16"]  # native bf16 CPU: both
    assert pick("auto", "fp32", on_gpu=False, side_by_side=False) == ["fp32"]          # emulated bf16: not timed
    assert pick("auto", "bf16", on_gpu=False, side_by_side=True) == ["bf16"]           # reference: the trainer's pick
    assert pick("auto", "fp32", on_gpu=False, side_by_side=True) == ["fp32"]
    assert pick("auto", "bf16", on_gpu=True, side_by_side=False) == ["bf16"]
    assert pick("bf16", "fp32", on_gpu=False, side_by_side=True) == ["bf16"]           # explicit wins


@pytest.mark.parametrize("bench", ["shard", "pipeline", "model", "train", "quality"])
def test_bench_help_says_what_is_compared_and_only_real_defaults(bench, capsys):
    """--help shows the whole docstring (the baseline, what `ratio` means) and each option's default,
    but not "(default: None)" for a value chosen at run time, nor a second default beside the help's own."""
    from lmim.tools.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["bench", bench, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "ratio" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    flat = " ".join(out.split())
    assert re.search(r"\(default [^)]*\) \(default: ", flat) is None      # "(default images) (default: images)"
