"""Counts and sizes on the command line: 0, a negative number or a word is a usage error (exit 2 and
one sentence naming the option) before a command builds data, starts workers or loads a model."""
from __future__ import annotations

import pytest

from lmim.tools import eval_cli
from lmim.tools.bench import pipeline as bench_pipeline
from lmim.tools.bench import shard as bench_shard
from lmim.tools.bench import train as bench_train
from lmim.tools.shard import cli as shard_cli

ENCODER = ["--encoder", "enc.safetensors"]


@pytest.mark.parametrize("main, argv, message", [
    (bench_train.main, ["--repeats", "0"], "argument --repeats: must be a positive whole number, got 0"),
    (bench_train.main, ["--steps", "-3"], "argument --steps: must be a positive whole number, got -3"),
    (bench_shard.main, ["--reps", "0"], "argument --reps: must be a positive whole number, got 0"),
    (bench_shard.main, ["--shard-mb", "0"], "argument --shard-mb: must be a positive number, got 0"),
    (bench_pipeline.main, ["--batch-size", "0"], "argument --batch-size: must be a positive whole number, got 0"),
    (bench_pipeline.main, ["--max-batches", "-1"], "argument --max-batches: must be 0 or more, got -1"),
    (shard_cli.main, ["src", "dst", "--workers", "0"], "argument --workers: must be a positive whole number, got 0"),
    (shard_cli.main, ["src", "dst", "--max-side", "two"], "argument --max-side: must be a whole number, got 'two'"),
    (eval_cli.main, ["knn", *ENCODER, "--eval-url", "d", "--k", "0"], "argument --k: must be a positive whole number"),
    (eval_cli.main, ["linear", *ENCODER, "--train-url", "a", "--eval-url", "b", "--lr", "nan"],
     "argument --lr: must be a positive number, got nan"),
    (bench_shard.main, ["--tmp", "/no/such/folder"], "--tmp '/no/such/folder' is not an existing folder"),
    (bench_pipeline.main, ["--device", "nope"], "argument --device: must be cpu, cuda or cuda:N, got 'nope'"),
    (bench_pipeline.main, ["--grid", "4", "--num-visible", "99"], "--num-visible: must be below the 16 patches"),
])
def test_bad_counts_are_usage_errors(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_help_lists_every_benchmark_with_what_it_measures(capsys):
    from lmim.tools.bench import cli as bench_cli

    assert bench_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in bench_cli.BENCHMARKS:
        assert f"  {name} " in out and bench_cli.SUMMARIES[name] in out
    assert bench_cli.main(["nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_quickstart_never_deletes_a_folder_that_is_not_an_earlier_run(tmp_path, capsys):
    """The quickstart starts afresh by deleting its run folder: only one that holds nothing but what a
    run writes. A folder with a config.yaml of the user's own next to other files must survive."""
    from lmim.tools import quickstart

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("lr: 1\n")
    (mine / "thesis.txt").write_text("years of work")
    assert quickstart.main(["--data-dir", str(tmp_path / "data"), "--run-dir", str(mine), "max_steps=1"]) == 2
    assert "is not a previous quickstart's run folder" in capsys.readouterr().err
    assert (mine / "thesis.txt").read_text() == "years of work"
    # An `lmim pretrain` run holds only what a run writes, but it is not the quickstart's: its
    # checkpoints must survive a quickstart pointed at it.
    pretrain_run = tmp_path / "pretrain-run"
    (pretrain_run / "checkpoints" / "step_00000046").mkdir(parents=True)
    (pretrain_run / "config.yaml").write_text("name: quickstart\n")
    (pretrain_run / "status.json").write_text('{"status": "completed"}\n')
    assert quickstart.main(["--data-dir", str(tmp_path / "data"), "--run-dir", str(pretrain_run), "max_steps=1"]) == 2
    assert "has no quickstart.json" in capsys.readouterr().err
    assert (pretrain_run / "checkpoints" / "step_00000046").is_dir()
    assert quickstart.main(["--data-dir", str(tmp_path / "data"), "--run-dir", str(mine / "thesis.txt")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert quickstart.main(["--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "a"),
                            f"run_dir={tmp_path / 'b'}"]) == 2
    assert "--run-dir" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()        # refused before any data was written


def test_bench_model_refuses_a_bad_device_or_too_many_visible_patches(capsys):
    from lmim.tools.bench import model as bench_model

    with pytest.raises(SystemExit) as exc:
        bench_model.main(["--device", "nope"])
    assert exc.value.code == 2 and "must be cpu, cuda or cuda:N" in capsys.readouterr().err
    assert bench_model.main(["--config", "tiny", "--num-visible", "99", "--steps", "1"]) == 2
    assert "must be below the 16 patches" in capsys.readouterr().err
