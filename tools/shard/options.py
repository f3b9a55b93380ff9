"""Command-line parsing helpers shared by `lmim shard`, `lmim merge` and `lmim verify`."""
from __future__ import annotations

import argparse
import json
import re
import sys

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'256MB', '1G', '1048576' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 256MB, 1GB or 1048576")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_part(text: str) -> tuple[int, int] | str:
    """`--part i/N`, or "auto" (resolved from the scheduler's environment by `scheduler.part_from_environment`)."""
    if text.strip() == "auto":
        return "auto"
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--part {text!r} must be i/N with 0 <= i < N (e.g. 0/4) or auto")
    return int(m.group(1)), int(m.group(2))


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def storage_options_from(pairs: list[str] | None, as_json: str | None) -> dict | None:
    """fsspec storage options from `--storage-options JSON` and repeated `--storage-option k=v`.

    Dotted keys nest (`client_kwargs.endpoint_url=http://...`); values are JSON when they parse
    as JSON (numbers, true/false), else strings.
    """
    out: dict = {}
    if as_json:
        try:
            out = json.loads(as_json)
        except ValueError:
            raise argparse.ArgumentTypeError("--storage-options must be a JSON object") from None
        if not isinstance(out, dict):
            raise argparse.ArgumentTypeError("--storage-options must be a JSON object")
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--storage-option must be key=value (got one without '=')")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _value(value)
    return out or None


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="fsspec storage option (repeatable; dotted keys nest, e.g. "
                             "client_kwargs.endpoint_url=http://host:9000); overrides the AWS environment")
    parser.add_argument("--storage-options", metavar="JSON", help="fsspec storage options as one JSON object")


def parse_storage_cli(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, dict | None] | None:
    """`parser.parse_args(argv)` and the storage options it holds; None, after one sentence on
    stderr, when they are malformed (the caller exits 2)."""
    try:
        args = parser.parse_args(argv)
        return args, storage_options_from(args.storage_option, args.storage_options)
    except argparse.ArgumentTypeError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return None
