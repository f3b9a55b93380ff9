"""`lmim shard SRC DST` and `lmim merge DST`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from lmim.pipeline.format.manifest import MANIFEST_NAME, REJECTS_NAME
from lmim.tools.argtypes import positive_int
from lmim.tools.shard.build import BuildResult, run_build
from lmim.tools.shard.config import BuildOptions
from lmim.tools.shard.errors import BuildError
from lmim.tools.shard.images import DEFAULT_MAX_PIXELS
from lmim.tools.shard.merge import merge_parts
from lmim.tools.shard.options import add_storage_arguments, parse_bytes, parse_part, parse_storage_cli
from lmim.tools.shard.scheduler import part_from_environment
from lmim.train.signals import interruption


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmim shard",
        description="Build WebDataset shards (+ DALI .idx + manifest.json) from a raw image corpus. "
                    "Re-running the same command after an interruption finishes the build.")
    p.add_argument("src", metavar="SRC", help="class-folder tree, flat folder, file list (path [label] per line) "
                                              "or tar archive; local path or URL (s3://bucket/prefix)")
    p.add_argument("dst", metavar="DST", help="dataset root: local folder or URL (s3://bucket/prefix)")
    p.add_argument("--shard-max-bytes", type=parse_bytes, default=256 << 20, metavar="SIZE",
                   help="shard size limit, e.g. 256MB (default) or 1GB")
    p.add_argument("--shard-max-samples", type=positive_int, default=None, metavar="N", help="sample limit per shard")
    p.add_argument("--workers", type=positive_int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="worker processes (default: CPU count, at most 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    p.add_argument("--part", type=parse_part, default=None, metavar="i/N|auto",
                   help="build slice i of N (one machine each); auto: i and N from a SLURM array, a Kubernetes "
                        "indexed Job or RANK/WORLD_SIZE. The last part to finish writes the manifest")
    p.add_argument("--labels", choices=("auto", "folders", "none"), default="auto",
                   help="class labels from sub-folder names (auto: when every image is in a sub-folder)")
    p.add_argument("--max-side", type=positive_int, default=None, metavar="PX",
                   help="re-encode images whose longer side is larger, as JPEG (default: keep originals)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded/converted images (default 95)")
    p.add_argument("--full-decode", action="store_true", help="decode every image to check it (slower)")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"reject images declaring more pixels (decompression bombs; default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not flush local shards to disk before moving them into place (a killed build "
                        "still resumes correctly; a power loss may not)")
    p.add_argument("--recheck", action="store_true",
                   help="also read every shard already built in full (as `lmim verify` does) and rebuild those "
                        "that are damaged; without it a re-run rebuilds only missing shards and shards of the wrong size")
    add_storage_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    return p


def main(argv: list[str]) -> int:
    parsed = parse_storage_cli(_parser(), argv)
    if parsed is None:
        return 2
    args, storage_options = parsed
    try:
        part = part_from_environment(os.environ) if args.part == "auto" else args.part
        options = BuildOptions(
            shard_max_bytes=args.shard_max_bytes, shard_max_samples=args.shard_max_samples, workers=args.workers,
            seed=args.seed, part=part, max_side=args.max_side, quality=args.quality, full_decode=args.full_decode,
            storage_options=storage_options, progress=not args.quiet, labels=args.labels, max_pixels=args.max_pixels,
            prefix=args.prefix, fsync=not args.no_fsync, recheck=args.recheck)
        result = run_build(args.src, args.dst, options)
    except BuildError as e:
        print(f"lmim shard: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:   # Ctrl-C (130) or SIGTERM (143: a scheduler must tell preemption apart)
        code, sentence = interruption(e, "run the same command again to finish the build")
        print(f"lmim shard: {sentence}", file=sys.stderr)
        return code
    if not args.quiet:
        print(_report(result), file=sys.stderr)
    summary = result.summary
    if args.json:
        print(json.dumps({**asdict(summary), "images_per_s": summary.images_per_s, "mb_per_s": summary.mb_per_s}))
    return 0


def _report(result: BuildResult) -> str:
    """What `lmim shard` says on stderr when a run ends (unless --quiet)."""
    s, (part_i, part_n) = result.summary, result.part
    shown = ", ".join(result.others_damaged[:3]) + (", ..." if len(result.others_damaged) > 3 else "")
    if result.others_damaged and not result.repaired:
        return (f"lmim shard: part {part_i}/{part_n}: its own shards of {result.dataset} are in place, but "
                f"{len(result.others_damaged)} of other parts are missing or damaged ({shown}): run those parts again, "
                f"or the whole build without --part, to rebuild them")
    if result.already_complete:
        return (f"lmim shard: {result.dataset} is already complete ({s.samples} samples in {s.shards} shards); "
                f"nothing to do")
    what = f"part {part_i}/{part_n} of " if part_n > 1 else ""
    lines = [f"lmim shard: {what}{result.dataset}",
             *([f"  repaired: rebuilt {len(result.repaired)} missing or damaged shards ({_names(result.repaired)})"]
               if result.repaired else []),
             f"  samples {s.samples}   shards {s.shards}   classes {s.classes}   rejects {s.rejects}"
             + (f" (see {REJECTS_NAME})" if s.rejects and s.complete else ""),
             f"  this run: {s.built_shards} shards built, {s.resumed_shards} already complete, "
             f"{s.images_read} images in {s.seconds:.1f} s ({s.images_per_s:.0f} img/s, {s.mb_per_s:.1f} MB/s)",
             f"  output: {s.bytes / 1e6:.1f} MB"]
    if part_n > 1 and s.complete:
        lines.append(f"  every part is done: this part, the last to finish, wrote {MANIFEST_NAME} (the counts "
                     f"above are the whole dataset's)")
    elif result.others_damaged:
        lines.append(f"  {len(result.others_damaged)} shards of other parts are missing or damaged ({shown}): run "
                     f"those parts again (the last to finish writes {MANIFEST_NAME}), or the whole build without --part")
    elif part_n > 1:
        lines.append(f"  other parts are still building; the last part to finish writes {MANIFEST_NAME} "
                     f"(or run `lmim merge {result.dataset}` once all {part_n} parts are done)")
    return "\n".join(lines)


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def merge_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmim merge",
                                description="Write manifest.json for a dataset built with `lmim shard --part i/N`.")
    p.add_argument("dst", metavar="DST", help="dataset root given to every part")
    add_storage_arguments(p)
    parsed = parse_storage_cli(p, argv)
    if parsed is None:
        return 2
    args, options = parsed
    try:
        manifest = merge_parts(args.dst, storage_options=options)
    except BuildError as e:
        print(f"lmim merge: {e}", file=sys.stderr)
        return e.exit_code
    print(f"lmim merge: {args.dst}: {manifest.total_samples} samples in {len(manifest.shards)} shards, "
          f"{manifest.build.get('rejects', 0)} rejects", file=sys.stderr)
    return 0
