"""`lmim bench <name> ...`: dispatch to one benchmark module's `main(argv)`."""
from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "shard": "tools.bench.shard",
    "pipeline": "tools.bench.pipeline",
    "model": "tools.bench.model",
    "train": "tools.bench.train",
    "quality": "tools.bench.quality",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmim bench {" + ",".join(BENCHMARKS) + "} [--json] [options]")
        return 0
    if argv[0] not in BENCHMARKS:
        print(f"lmim bench: unknown benchmark {argv[0]!r}; choose one of {', '.join(BENCHMARKS)}.", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0)
