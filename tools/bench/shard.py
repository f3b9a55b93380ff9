"""`lmim bench shard`: the shard builder against a webdataset.ShardWriter loop and `tar cf`.

    lmim bench shard                          # 3000 ImageNet-like JPEGs (~500 x 375), 2 workers
    lmim bench shard --n 1000 --reps 3 --json
    lmim bench shard --src /data/imagenet/val --workers 8

Same files, same run, alternating ours / ShardWriter loop / tar for `--reps` rounds; medians.
- ours: `build_dataset(..., workers=W)` in pass-through mode: listing, seeded shuffle, header and
  end-marker check of every image, tar + DALI index + XXH3 checksum + fsync per shard, atomic
  move, manifest. (The baselines do none of the checks and write no index.) Also timed with
  `--no-fsync`: neither baseline fsyncs, so that row is the like-for-like one.
- ShardWriter loop: what most users write: one process reads each file and writes
  {__key__, jpg, cls} with `webdataset.ShardWriter` (same shard byte limit).
- tar: `tar cf` of the same files (the I/O floor, one process).
Files are read once before timing so every contender reads from the page cache.
`ratio` = ShardWriter time / ours (higher is better); `ratio_vs_tar` = tar time / ours.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmim.tools.argtypes import HelpFormatter, positive_float, positive_int
from lmim.tools.shard.errors import BuildError
from lmim.train.hardware import describe_machine


def _files(src: Path) -> list[tuple[Path, int | None]]:
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    classes = sorted({p.relative_to(src).parts[0] for p in files if len(p.relative_to(src).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index.get(p.relative_to(src).parts[0]) if classes else None) for p in files]


def run_ours(src: Path, out: Path, workers: int, shard_bytes: int, fsync: bool = True) -> None:
    from lmim.tools.shard import build_dataset

    build_dataset(str(src), str(out), shard_max_bytes=shard_bytes, workers=workers, progress=False, fsync=fsync)


def run_shardwriter(files: list[tuple[Path, int | None]], out: Path, shard_bytes: int) -> None:
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=shard_bytes, maxcount=10**9, verbose=0) as sink:
        for i, (path, label) in enumerate(files):
            sample = {"__key__": f"{i:08d}", "jpg": path.read_bytes()}
            if label is not None:
                sample["cls"] = label
            sink.write(sample)


def run_tar(src: Path, out: Path) -> None:
    out.mkdir(parents=True)
    subprocess.run(["tar", "cf", str(out / "all.tar"), "-C", str(src), "."], check=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmim bench shard", description=__doc__,
                                 formatter_class=HelpFormatter)
    p.add_argument("--n", type=positive_int, default=3000, help="images to generate (ignored with --src)")
    p.add_argument("--src", default=None, help="use this folder of images instead of generating them")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--reps", type=positive_int, default=5, help="rounds of (ours, ShardWriter, tar); medians reported")
    p.add_argument("--shard-mb", type=positive_float, default=16.0,
                   help="shard size limit for ours and ShardWriter (default 16 MB: ~9 shards of the default "
                        "corpus, so the workers have shards to share, as with a real corpus of 256 MB shards)")
    p.add_argument("--classes", type=positive_int, default=10, help="class folders of the generated corpus")
    p.add_argument("--tmp", default=None, help="scratch folder (default: the system temp folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if args.tmp is not None and not Path(args.tmp).is_dir():
        p.error(f"--tmp {args.tmp!r} is not an existing folder; create it or leave --tmp out (the system temp folder)")

    scratch = Path(tempfile.mkdtemp(prefix="lmim-bench-shard-", dir=args.tmp))
    try:
        if args.src:
            src = Path(args.src)
            if not src.is_dir():
                print(f"lmim bench shard: --src {src} is not a folder; give a folder of images, or leave --src "
                      "out to time a generated corpus", file=sys.stderr)
                return 2
        else:
            from lmim.tools.sample_images import write_photo_jpegs

            src = scratch / "src"
            t = time.perf_counter()
            write_photo_jpegs(src, args.n, num_classes=args.classes, seed=0)
            print(f"generated {args.n} JPEGs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        files = _files(src)
        n = len(files)
        if n == 0:
            print(f"lmim bench shard: --src {src} holds no files; give a folder of images", file=sys.stderr)
            return 2
        total_bytes = sum(f.stat().st_size for f, _ in files)
        shard_bytes = int(args.shard_mb * (1 << 20))
        # warm the page cache (and the imports) so that no contender pays for the first read
        for f, _ in files:
            f.read_bytes()
        import fsspec  # noqa: F401
        import lmim.tools.shard  # noqa: F401
        import webdataset  # noqa: F401

        contenders = {
            "ours": lambda out: run_ours(src, out, args.workers, shard_bytes),
            "ours_no_fsync": lambda out: run_ours(src, out, args.workers, shard_bytes, fsync=False),
            "shardwriter": lambda out: run_shardwriter(files, out, shard_bytes),
            "tar": lambda out: run_tar(src, out),
        }
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for rep in range(args.reps):
            for name, fn in contenders.items():
                out = scratch / f"out-{name}-{rep}"
                t = time.perf_counter()
                try:
                    fn(out)
                except BuildError as e:   # e.g. not one readable image in --src
                    print(f"lmim bench shard: the shard builder cannot use --src {src}: {str(e).split(' (each ')[0]}",
                          file=sys.stderr)
                    return e.exit_code
                times[name].append(time.perf_counter() - t)
                shutil.rmtree(out)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows = [
            (f"lmim shard ({args.workers} workers, pass-through)", "ours"),
            ("lmim shard --no-fsync (like the baselines)", "ours_no_fsync"),
            ("webdataset.ShardWriter loop (1 process)", "shardwriter"),
            ("tar cf (I/O floor)", "tar"),
        ]
        mb = total_bytes / 1e6
        print(f"\n{n} images, {mb:.1f} MB, shard limit {args.shard_mb:g} MB, {args.reps} rounds, median; "
              f"{os.cpu_count()} CPUs")
        print(f"{'contender':<44} {'seconds':>8} {'images/s':>9} {'MB/s':>8}")
        for label, key in rows:
            print(f"{label:<44} {med[key]:>8.3f} {n / med[key]:>9.0f} {mb / med[key]:>8.1f}")
        ratio = med["shardwriter"] / med["ours"]
        ratio_tar = med["tar"] / med["ours"]
        ratio_tar_nofsync = med["tar"] / med["ours_no_fsync"]
        print(f"ours vs ShardWriter loop: {ratio:.2f}x   ours vs tar: {ratio_tar:.2f}x "
              f"(ours takes {1 / ratio_tar:.2f}x the tar time; {1 / ratio_tar_nofsync:.2f}x with --no-fsync)")
        if args.json:
            print(json.dumps({
                "benchmark": "shard", "machine": describe_machine("cpu"), "images": n, "mb": round(mb, 2), "workers": args.workers, "reps": args.reps,
                "shard_mb": args.shard_mb, "seconds": {k: round(v, 4) for k, v in med.items()},
                "all_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
                "images_per_s": {k: round(n / v, 1) for k, v in med.items()},
                "mb_per_s": {k: round(mb / v, 2) for k, v in med.items()},
                "ratio": round(ratio, 3), "ratio_vs_tar": round(ratio_tar, 3),
                "ratio_vs_tar_no_fsync": round(ratio_tar_nofsync, 3)}))
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
