"""`lmim verify DST`: re-read a dataset and check it against its manifest.

Per shard, in one sequential read (so a remote shard costs a few GETs): the tar exists, its size
and checksum match the manifest, it parses as a tar, the `.idx` lists exactly its members (same
names, offsets and sizes, grouped per sample as DALI's `wds2idx` groups them) and the manifest's
sample count, every sample has one image, a `.json` with integer width/height, a `.cls` within
the class list when the dataset is labelled, and keys are unique across the dataset with no dot.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from typing import Any

from lmim.pipeline.format.checksum import algorithm_of, format_checksum, hasher_like
from lmim.pipeline.format.index import INDEX_VERSION, lines_of_members
from lmim.pipeline.format.keys import IMAGE_EXTENSIONS, is_readable_key, split_member
from lmim.pipeline.format.manifest import Manifest, ShardInfo, read_manifest
from lmim.pipeline.format.sample_meta import image_size
from lmim.pipeline.storage import Store
from lmim.tools.shard.errors import BuildError, rejected_option
from lmim.tools.shard.options import add_storage_arguments, parse_storage_cli


class _HashingReader:
    """A read-only file wrapper that hashes everything read through it (tarfile's stream mode reads it all)."""

    def __init__(self, f, hasher):
        self.f = f
        self.sha = hasher
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.n += len(data)
        return data

    def drain(self) -> None:
        while self.read(4 << 20):
            pass


def _check_shard(store: Store, shard: ShardInfo, classes: list[str] | None, seen_keys: dict[str, str]) -> list[str]:
    where = f"shard {shard.name}"
    problems: list[str] = []
    members: list[tuple[str, int, int]] = []
    samples: dict[str, dict[str, Any]] = {}
    try:
        with store.open(shard.name, block_size=8 << 20) as raw:
            reader = _HashingReader(raw, hasher_like(shard.checksum))
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tf:
                    for m in tf:
                        if not m.isreg():
                            continue
                        members.append((m.name, m.offset_data, m.size))
                        key, ext = split_member(m.name)
                        sample = samples.setdefault(key, {})
                        if ext in ("json", "cls"):
                            sample[ext] = tf.extractfile(m).read()
                        else:
                            sample.setdefault("images", []).append(ext)
            except tarfile.TarError as e:
                problems.append(f"{where}: not a readable tar ({e})")
            reader.drain()
    except FileNotFoundError:
        return [f"{where}: missing ({store.url_of(shard.name)} does not exist)"]
    if reader.n != shard.bytes:
        problems.append(f"{where}: size is {reader.n} bytes, the manifest says {shard.bytes}")
    if format_checksum(reader.sha, algorithm_of(shard.checksum)) != shard.checksum:
        problems.append(f"{where}: checksum does not match the manifest (the shard is corrupt or was modified)")
    if len(samples) != shard.samples:
        problems.append(f"{where}: holds {len(samples)} samples, the manifest says {shard.samples}")
    for key, sample in samples.items():
        if not is_readable_key(key):
            problems.append(f"{where}: sample key {key!r} holds a dot or a space")
        if key in seen_keys:
            problems.append(f"{where}: sample key {key!r} also occurs in {seen_keys[key]}")
        seen_keys[key] = shard.name
        images = [e for e in sample.get("images", []) if e in IMAGE_EXTENSIONS]
        if len(images) != 1:
            problems.append(f"{where}: sample {key!r} has {len(images)} images ({', '.join(IMAGE_EXTENSIONS)})")
        if "json" not in sample:
            problems.append(f"{where}: sample {key!r} has no .json with integer width and height")
        else:
            try:
                image_size(sample["json"])
            except ValueError as why:
                problems.append(f"{where}: sample {key!r} has {why}")
        if classes is not None and "cls" in sample:
            try:
                label = int(sample["cls"].decode().strip())
                if not 0 <= label < len(classes):
                    raise ValueError
            except ValueError:
                problems.append(f"{where}: sample {key!r} has a .cls outside 0..{len(classes) - 1}")
        if len(problems) > 20:
            problems.append(f"{where}: (more problems not listed)")
            return problems
    try:
        idx_lines = [ln for ln in store.read_bytes(shard.index).decode("utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        problems.append(f"{where}: index {shard.index} is missing")
        return problems
    expected = lines_of_members(members)
    if not idx_lines or idx_lines[0].split()[:1] != [INDEX_VERSION]:
        problems.append(f"{where}: index {shard.index} has no '{INDEX_VERSION} N' header")
    else:
        head = idx_lines[0].split()
        if len(head) != 2 or head[1] != str(len(idx_lines) - 1) or len(idx_lines) - 1 != shard.samples:
            problems.append(f"{where}: index {shard.index} lists {len(idx_lines) - 1} samples "
                            f"(header: {' '.join(head[1:])}), the manifest says {shard.samples}")
        elif idx_lines[1:] != expected:
            bad = next((n for n, (a, b) in enumerate(zip(idx_lines[1:], expected)) if a != b), 0)
            problems.append(f"{where}: index {shard.index} does not match the tar (first difference at sample {bad})")
    return problems


def shard_problems(store: Store, shard: ShardInfo, classes: list[str] | None) -> list[str]:
    """What `lmim verify` finds wrong in this one shard and its index (one sequential read of the
    shard); [] when it is sound. Keys are not compared with other shards': a re-run of `lmim shard
    --recheck` rebuilds the shards this names, and a duplicate key elsewhere is not theirs to mend."""
    return _check_shard(store, shard, classes, {})


def verify_dataset(root: str, storage_options: dict | None = None) -> list[str]:
    """Check the dataset at `root`; returns one line per problem ([] when it is sound).

    Raises BuildError (exit 2) when the store's client refuses one of `storage_options`."""
    opts = dict(storage_options or {})
    try:
        manifest: Manifest = read_manifest(root, opts)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        rejected = rejected_option(root, e)
        if rejected is not None:  # the options are wrong, not the dataset
            raise rejected from None
        return [f"manifest: {e}"]
    problems: list[str] = []
    names = [s.name for s in manifest.shards]
    if len(set(names)) != len(names):
        problems.append("manifest: a shard is listed twice")
    seen: dict[str, str] = {}
    store = Store(root, opts)
    for shard in manifest.shards:
        problems += _check_shard(store, shard, manifest.classes, seen)
    return problems


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmim verify", description="Check a dataset's shards and indices against its manifest.")
    p.add_argument("dst", metavar="DST", help="dataset root (local folder or URL)")
    add_storage_arguments(p)
    p.add_argument("--decode", action="store_true",
                   help="also read every sample with DALI (as the pipeline does) and decode it on the CPU")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    parsed = parse_storage_cli(p, argv)
    if parsed is None:
        return 2
    args, options = parsed
    try:
        problems = verify_dataset(args.dst, options)
        if args.decode and not problems:
            from lmim.tools.shard.readback import decode_check

            problems = decode_check(args.dst, options)
    except BuildError as e:  # a refused storage option, a store that stopped answering: not the dataset's fault
        print(f"lmim verify: {e}", file=sys.stderr)
        return e.exit_code
    for line in problems:
        print(f"lmim verify: {line}", file=sys.stderr)
    if any(line.startswith("shard ") for line in problems):  # what mends them (a re-run alone trusts same-size shards)
        print(f"lmim verify: to rebuild the damaged shards, run the `lmim shard SRC {args.dst}` command that built "
              f"the dataset again with --recheck", file=sys.stderr)
    ok = not problems
    if ok:
        m = read_manifest(args.dst, options)
        print(f"lmim verify: {args.dst}: OK, {m.total_samples} samples in {len(m.shards)} shards", file=sys.stderr)
    if args.json:
        print(json.dumps({"ok": ok, "problems": problems}))
    return 0 if ok else 1
