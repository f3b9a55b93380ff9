"""The `lmim` console script: a thin dispatcher to each sub-command's own module.

Each sub-command lives in its own module with a `main(argv: list[str]) -> int`; importing
lazily keeps `lmim --help` fast and lets a sub-command's heavy imports (DALI, torch) stay
out of the others.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

from lmim.train.signals import RUN_AGAIN, interruption, sigterm_interrupts

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("lmim.tools.shard.cli", "build WebDataset shards from a raw image corpus (local or s3://)"),
    "merge": ("lmim.tools.shard.cli:merge_main", "write the manifest of a --part i/N build again (the last part to finish writes it already)"),
    "verify": ("lmim.tools.shard.verify", "re-read a dataset and check it against its manifest"),
    "export": ("lmim.tools.export", "export a checkpoint's encoder for timm: one .safetensors file, or a timm / Hugging Face folder"),
    "pretrain": ("lmim.train.pretrain", "pretrain Latent MIM (same as `accelerate launch -m lmim.train.pretrain`)"),
    "quickstart": ("lmim.tools.quickstart", "shard a small real dataset, pretrain a tiny ViT on the CPU, evaluate, export"),
    "eval": ("lmim.tools.eval_cli", "evaluate an encoder: knn | linear | collapse"),
    "bench": ("lmim.tools.bench.cli", "benchmarks: shard | pipeline | model | train | quality"),
}

# the commands that take --storage-option (the others reach an object store through the AWS_* environment only)
_TAKE_STORAGE_OPTIONS = frozenset({"shard", "merge", "verify", "eval"})


def _usage() -> str:
    lines = ["usage: lmim <command> [args...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`lmim <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lmim: unknown command {name!r}; run `lmim --help` for the list.", file=sys.stderr)
        return 2
    module_name, _, func_name = COMMANDS[name][0].partition(":")
    # SIGTERM unwinds a command as Ctrl-C does (train/signals.py): its temporary folders are removed
    # and the processes it started are stopped, also while its imports are still loading.
    with sigterm_interrupts():
        try:
            func = getattr(importlib.import_module(module_name), func_name or "main")
            result = func(rest)
            sys.stdout.flush()  # a reader that went away shows here, not in Python's flush at exit
        except (Exception, KeyboardInterrupt) as err:
            return _safety_net(name, err)
    return int(result or 0)


def _safety_net(name: str, err: BaseException) -> int:
    """The safety net under every sub-command: an expected failure it did not phrase itself (a full
    disk under the shard builder, refused credentials, Ctrl-C) still ends as one sentence with the
    documented exit code; anything else is a bug and keeps its traceback."""
    stopped = interruption(err, RUN_AGAIN)
    if stopped is not None:  # before importing failures: Ctrl-C may have cut torch's import in half
        print(f"lmim {name}: {stopped[1]}", file=sys.stderr)
        return stopped[0]
    from lmim.train.failures import ENVIRONMENT_ONLY, EXIT_CLOSED_PIPE, ONE_COMMAND, classify, silence_stdout

    failure = classify(err, ONE_COMMAND if name in _TAKE_STORAGE_OPTIONS else ENVIRONMENT_ONLY)
    if not failure.expected:   # a bug: its traceback, one line, and 70, never 1 (`lmim verify`'s "found a problem")
        traceback.print_exception(err, file=sys.stderr)
        print(f"lmim {name}: unexpected {type(err).__name__}: {' '.join(str(err).split())[:500]} (a bug; please "
              "report it with the traceback above)", file=sys.stderr)
        return failure.code
    if os.environ.get("LMIM_DEBUG"):
        traceback.print_exception(err, file=sys.stderr)
    if failure.code == EXIT_CLOSED_PIPE:  # `lmim ... | head`: the reader left; nothing to report, as a SIGPIPE'd tool
        silence_stdout()
        return failure.code
    print(f"lmim {name}: {failure.sentence}", file=sys.stderr)
    return failure.code


if __name__ == "__main__":
    sys.exit(main())
