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
