"""`lmim bench <name> ...`: dispatch to one benchmark module's `main(argv)`."""
from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "shard": "lmim.tools.bench.shard",
    "pipeline": "lmim.tools.bench.pipeline",
    "model": "lmim.tools.bench.model",
    "train": "lmim.tools.bench.train",
    "quality": "lmim.tools.bench.quality",
}

# name -> what it measures, against which baseline (the `lmim bench --help` listing)
SUMMARIES: dict[str, str] = {
    "shard": "the shard builder against a webdataset.ShardWriter loop and tar",
    "pipeline": "the DALI loader against a webdataset + PIL + DataLoader baseline (local or loopback S3)",
    "model": "FLOPs by part and the training step against a plain eager step (or --reference DIR)",
    "train": "the full trainer fed by DALI against the bare model step (and the trainer fed ideal batches)",
    "quality": "k-NN / linear probe of Latent MIM against MAE, naive, supervised and raw pixels, same budget",
}


def _usage() -> str:
    lines = ["usage: lmim bench {" + ",".join(BENCHMARKS) + "} [--json] [options]", "", "benchmarks:"]
    lines += [f"  {name:<9} {SUMMARIES[name]}" for name in BENCHMARKS]
    lines += ["", "Each prints its machine first and a table; --json ends with one JSON object whose",
              "`ratio` is ours over the baseline (higher is better). `lmim bench NAME --help` shows options."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in BENCHMARKS:
        print(f"lmim bench: unknown benchmark {argv[0]!r}; choose one of {', '.join(BENCHMARKS)}.", file=sys.stderr)
        return 2
    if not any(a in ("-h", "--help") for a in argv[1:]):
        # Figures from different machines must never be compared by accident: name this one first.
        print(f"machine: {machine_for(argv[1:])}", flush=True)
    return int(importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0)


def machine_for(argv: list[str]) -> str:
    """The machine line for a benchmark run with these arguments (the GPU when it runs on one)."""
    from lmim.train.hardware import describe_machine

    return describe_machine(bench_device(argv))


def bench_device(argv: list[str]) -> str:
    """The device a benchmark run with these arguments measures: `--device cuda[:N]` or
    `--device=cuda[:N]` as given (GPU N's name, not GPU 0's), "cuda" for `quality --large`, else "cpu"."""
    device = "cuda" if "--large" in argv else "cpu"
    for i, arg in enumerate(argv):
        option, has_value, value = arg.partition("=")
        if not (option.startswith("--de") and "--device".startswith(option)):  # argparse takes --dev too
            continue
        if not has_value:
            if i + 1 == len(argv):
                continue
            value = argv[i + 1]
        device = value if value.startswith("cuda") else "cpu"
    return device
